"""Tests of the fused OLSS step (olss_fast.kernels.fused_step) against an independent float64 reference.

The Triton kernel runs on the CPU through Triton's interpreter. ``TRITON_INTERPRET=1`` has to be set before triton
is imported, and in a whole-suite pytest process triton may already have been imported without it (diffusers and
torch._inductor import it). So the interpreted launches run in ONE subprocess: this file doubles as that
subprocess's script (``python tests/test_kernels.py --run-triton IN OUT``). The parent process builds every input
(fresh random tensors, outputs poisoned with NaN, history slots >= j and the unused coefficient entries poisoned with
NaN so that any read of them shows), the child only launches the kernel and saves what it wrote, and the parent
checks the results against float64 arithmetic written out here (not the library's reference).

On a CUDA machine the ``gpu``-marked tests run the compiled kernel in-process, including inside a CUDA graph that is
replayed with new coefficients and a new guidance scale.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # subprocess mode: must precede any triton import
    os.environ["TRITON_INTERPRET"] = "1"

import importlib.util
import itertools
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

HAS_TRITON_PKG = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# tolerances for the next model input (cast to the dtype) against float64; history slot j is float32 always
OUT_TOL = {
    torch.float32: dict(rtol=2e-5, atol=2e-4),  # float32 accumulation of up to n+1 terms of size ~50
    torch.float16: dict(rtol=1.5e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
HIST_TOL = dict(rtol=1e-5, atol=1e-5)
N_STEPS = 4
SHAPE = (3, 5, 7)  # 105 elements per sample: not a multiple of the test block size (64) nor of 1024
TEST_BLOCK = 64

# config: (dtype name, batch, guidance kind, coeff kind, out layout)
CONFIGS = list(
    itertools.product(DTYPES, (1, 3), ("none", "float", "tensor"), ("global", "channel"), ("both", "single"))
)


def _cfg_id(cfg: tuple) -> str:
    return "-".join(str(c) for c in cfg)


# ------------------------------------------------------------------------------------------------ case building
def _make_case(
    cfg: tuple, step: int, seed: int, *, shape: tuple = SHAPE, n: int = N_STEPS, device: str = "cpu"
) -> dict[str, Any]:
    """Fresh random inputs for one launch; every output location the kernel must write is NaN beforehand."""
    dtype_name, batch, gkind, ckind, layout = cfg
    dtype = DTYPES[dtype_name]
    gen = torch.Generator().manual_seed(seed)
    guided = gkind != "none"
    mo = torch.randn((2 * batch if guided else batch, *shape), generator=gen).to(dtype)
    x0 = torch.randn((batch, *shape), generator=gen)
    history = torch.randn((n, batch, *shape), generator=gen)
    history[step:] = float("nan")  # slot j must be written, slots > j must be neither read nor written
    cshape = (shape[0], n, n + 1) if ckind == "channel" else (n, n + 1)
    coeffs = torch.randn(cshape, generator=gen)
    coeffs[..., step, step + 2 :] = float("nan")  # never read: only x0 and e_0..e_j enter row j
    out_batch = 2 * batch if layout == "both" else batch
    out = torch.full((out_batch, *shape), float("nan"), dtype=dtype)
    g: Any = None
    if gkind == "float":
        g = float(1.0 + 7.0 * torch.rand((), generator=gen))
    elif gkind == "tensor":
        g = (1.0 + 7.0 * torch.rand((1,), generator=gen)).float()
    case = dict(mo=mo, x0=x0, history=history, coeffs=coeffs, out=out, g=g, step=step)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def _expected(case: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``e_j`` and ``x_{j+1}`` written out directly from the definitions (CFG, then OLSS Eq. 8)."""
    j = case["step"]
    mo = case["mo"].double().cpu()
    g = case["g"]
    if g is not None:
        b = mo.shape[0] // 2
        gv = float(g) if not isinstance(g, torch.Tensor) else float(g.double().item())
        e = mo[:b] + gv * (mo[b:] - mo[:b])
    else:
        e = mo
    x0 = case["x0"].double().cpu()
    hist = case["history"].double().cpu()
    coeffs = case["coeffs"].double().cpu()
    basis = [x0] + [hist[i] for i in range(j)] + [e]
    x = torch.zeros_like(x0)
    for k, vec in enumerate(basis):
        if coeffs.dim() == 2:
            x = x + coeffs[j, k] * vec
        else:
            c = coeffs[:, j, k].view([1, -1] + [1] * (x0.dim() - 2))
            x = x + c * vec
    return e, x


def _check_result(case: dict[str, Any], out: torch.Tensor, history: torch.Tensor) -> None:
    j = case["step"]
    dtype = case["out"].dtype
    e64, x64 = _expected(case)
    out, history = out.cpu(), history.cpu()
    b = x64.shape[0]
    assert out.dtype == dtype
    assert not torch.isnan(out).any(), "output not fully written (NaN left from the poison)"
    tol = OUT_TOL[dtype]
    torch.testing.assert_close(out[:b].double(), x64, **tol)
    if out.shape[0] == 2 * b:
        torch.testing.assert_close(out[b:], out[:b], rtol=0, atol=0)
    torch.testing.assert_close(history[j].double(), e64, **HIST_TOL)
    before = case["history"].cpu()
    torch.testing.assert_close(history[:j], before[:j], rtol=0, atol=0)  # earlier slots untouched
    assert torch.isnan(history[j + 1 :]).all(), "history slots after j were written"


def _all_cases(seed0: int) -> dict[str, list[dict[str, Any]]]:
    cases: dict[str, list[dict[str, Any]]] = {}
    for ci, cfg in enumerate(CONFIGS):
        cases[_cfg_id(cfg)] = [_make_case(cfg, j, seed0 + 100 * ci + j) for j in range(N_STEPS)]
    # default block size (1024) with 2 * 1292 elements: two programs, the second partial
    big = ("fp16", 2, "float", "channel", "both")
    cases["big-default-block"] = [_make_case(big, j, seed0 + 99_000 + j, shape=(4, 17, 19)) for j in range(N_STEPS)]
    # the int64-offset variant of the kernel (forced via INT64_THRESHOLD in the child)
    cases["int64-offsets"] = [
        _make_case(("bf16", 3, "tensor", "global", "both"), j, seed0 + 98_000 + j) for j in range(N_STEPS)
    ]
    return cases


def _launch(case: dict[str, Any], backend: str, block_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    from olss_fast.kernels.fused_step import fused_olss_step

    out, history = case["out"].clone(), case["history"].clone()
    ret = fused_olss_step(
        case["mo"], case["coeffs"], case["step"], case["x0"], history, out, case["g"],
        backend=backend, block_size=block_size,
    )
    assert ret is out
    return out, history


# ------------------------------------------------------------------------------------------------ subprocess mode
def _child_main(in_path: str, out_path: str) -> None:
    """Run every case through the interpreted Triton kernel and save (out, history) per case."""
    from olss_fast.kernels import fused_step

    assert fused_step.HAS_TRITON, "triton did not import in the interpreter subprocess"
    cases = torch.load(in_path, weights_only=False)
    results: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for name, per_step in cases.items():
        block = None if name == "big-default-block" else TEST_BLOCK
        if name == "int64-offsets":
            fused_step.INT64_THRESHOLD = 0
        results[name] = [_launch(c, "triton", block) for c in per_step]
        fused_step.INT64_THRESHOLD = 2**31
    torch.save(results, out_path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    if not HAS_TRITON_PKG:
        pytest.skip("triton is not installed")
    tmp = tmp_path_factory.mktemp("kernels")
    cases = _all_cases(seed0=int(torch.randint(0, 2**20, ()).item()))  # fresh inputs every run
    in_path, out_path = tmp / "cases.pt", tmp / "results.pt"
    torch.save(cases, in_path)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("OLSS_FAST_FORCE_REFERENCE", None)
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--run-triton", str(in_path), str(out_path)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0:
        raise AssertionError(f"interpreted Triton subprocess failed:\n{proc.stdout}\n{proc.stderr}")
    return cases, torch.load(out_path, weights_only=False)


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_triton_interpreted_matches_float64(interpreted: tuple[dict, dict], cfg: tuple) -> None:
    cases, results = interpreted
    for case, (out, history) in zip(cases[_cfg_id(cfg)], results[_cfg_id(cfg)]):
        _check_result(case, out, history)


@pytest.mark.parametrize("name", ["big-default-block", "int64-offsets"])
def test_triton_interpreted_special_layouts(interpreted: tuple[dict, dict], name: str) -> None:
    cases, results = interpreted
    assert len(results[name]) == N_STEPS
    for case, (out, history) in zip(cases[name], results[name]):
        _check_result(case, out, history)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_reference_matches_float64(cfg: tuple) -> None:
    seed = int(torch.randint(0, 2**20, ()).item())
    for j in range(N_STEPS):
        case = _make_case(cfg, j, seed + j)
        out, history = _launch(case, "reference", None)
        _check_result(case, out, history)


def test_reference_chain_equals_olss_combine_loop() -> None:
    """A whole n-step chain through the fused API equals the plain loop over olss_fast.core.step.olss_combine."""
    from olss_fast.kernels.fused_step import fused_olss_step, unfused_olss_step

    gen = torch.Generator().manual_seed(3)
    n, b = 5, 2
    coeffs = torch.randn(n, n + 1, generator=gen).tril(1)
    x0 = torch.randn(b, *SHAPE, generator=gen)
    weights = torch.randn(2 * b, *SHAPE, generator=gen)  # a fake "model": output = tanh(weights * input)
    hist = torch.full((n, b, *SHAPE), float("nan"))
    inp = torch.cat([x0, x0])
    plain_hist: list[torch.Tensor] = []
    plain_inp = inp.clone()
    for j in range(n):
        fused_olss_step(torch.tanh(weights * inp), coeffs, j, x0, hist, inp, 4.0)
        plain_inp = unfused_olss_step(torch.tanh(weights * plain_inp), coeffs, j, x0, plain_hist, 4.0)
        torch.testing.assert_close(inp, plain_inp, rtol=1e-6, atol=1e-6)


def test_dispatch_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    from olss_fast.kernels import fused_step as fs

    monkeypatch.delenv(fs.FORCE_REFERENCE_ENV, raising=False)
    monkeypatch.delenv(fs.FORCE_TRITON_ENV, raising=False)
    assert fs.select_backend(torch.device("cpu")) == "reference"
    assert fs.select_backend(torch.device("cuda")) == ("triton" if fs.HAS_TRITON else "reference")
    monkeypatch.setenv(fs.FORCE_REFERENCE_ENV, "1")
    assert fs.select_backend(torch.device("cuda")) == "reference"
    if fs.HAS_TRITON:
        assert fs.select_backend(torch.device("cpu"), "triton") == "triton"  # explicit beats the env var
        monkeypatch.delenv(fs.FORCE_REFERENCE_ENV)
        monkeypatch.setenv(fs.FORCE_TRITON_ENV, "1")
        assert fs.select_backend(torch.device("cpu")) == "triton"
    assert fs.select_backend(torch.device("cpu"), "reference") == "reference"
    with pytest.raises(ValueError, match="unknown fused-step backend"):
        fs.select_backend(torch.device("cpu"), "cuda")


def test_validation_errors() -> None:
    from olss_fast.kernels.fused_step import fused_olss_step

    case = _make_case(("fp32", 2, "float", "global", "both"), 1, seed=0)
    mo, coeffs, x0, hist, out, g = (case[k] for k in ("mo", "coeffs", "x0", "history", "out", "g"))
    with pytest.raises(ValueError, match="model_output must be"):
        fused_olss_step(mo[:2], coeffs, 1, x0, hist, out, g)  # guided but only B rows
    with pytest.raises(ValueError, match="model_output must be"):
        fused_olss_step(mo, coeffs, 1, x0, hist, out, None)  # 2B rows without guidance
    with pytest.raises(ValueError, match="out of range"):
        fused_olss_step(mo, coeffs, N_STEPS, x0, hist, out, g)
    with pytest.raises(ValueError, match="x0 must be float32"):
        fused_olss_step(mo, coeffs, 1, x0.half(), hist, out, g)
    with pytest.raises(ValueError, match="history must be"):
        fused_olss_step(mo, coeffs, 1, x0, hist[:-1], out, g)
    with pytest.raises(ValueError, match="out must be"):
        fused_olss_step(mo, coeffs, 1, x0, hist, out[:1], g)
    with pytest.raises(ValueError, match="per-channel coeffs"):
        fused_olss_step(mo, torch.zeros(5, N_STEPS, N_STEPS + 1), 1, x0, hist, out, g)
    with pytest.raises(ValueError, match="coeffs must be a float32"):
        fused_olss_step(mo, coeffs.double(), 1, x0, hist, out, g)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from olss_fast.kernels import fused_step as fs

    if not fs.HAS_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = _make_case(("fp32", 1, "none", "global", "single"), 0, seed=1)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _launch(case, "triton", TEST_BLOCK)


# ------------------------------------------------------------------------------------------------ GPU
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("batch,shape", [(1, (4, 64, 64)), (3, (4, 65, 67))], ids=["sd-latent", "odd"])
def test_triton_cuda_matches_float64(dtype_name: str, batch: int, shape: tuple) -> None:
    """Compiled kernel on the GPU, n = 10, every step; all layouts for fp16, the CFG-natural ones for fp32/bf16
    (each constexpr combination is a separate Triton compile, which costs GPU-machine time)."""
    from olss_fast.kernels.fused_step import select_backend

    assert select_backend(torch.device("cuda")) == "triton" or os.environ.get("OLSS_FAST_FORCE_REFERENCE")
    n = 10
    combos = list(itertools.product(("none", "float", "tensor"), ("global", "channel"), ("both", "single")))
    if dtype_name != "fp16":
        combos = [c for c in combos if (c[2] == "both") == (c[0] != "none")]
    for gkind, ckind, layout in combos:
        for j in range(n):
            case = _make_case((dtype_name, batch, gkind, ckind, layout), j, seed=1000 * j + batch, shape=shape,
                              n=n, device="cuda")
            out, history = _launch(case, "triton", None)
            _check_result(case, out, history)


@pytest.mark.gpu
@gpu
def test_triton_in_cuda_graph_with_new_coefficients() -> None:
    """Capture all n fused steps in one CUDA graph, then copy new coefficients / guidance in and replay."""
    from olss_fast.kernels.fused_step import fused_olss_step

    n, b, shape, dtype = 6, 2, (4, 33, 31), torch.float16
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(7)
    coeffs = torch.zeros(n, n + 1, device=dev)
    g = torch.ones(1, device=dev)
    x0 = torch.empty(b, *shape, device=dev)
    # a gentle fake model (small weights, small guidance): a 1-ulp fp16 rounding difference between the kernel and
    # the float64 reference must not be amplified from step to step
    weights = (0.3 * torch.randn(2 * b, *shape, generator=gen)).to(dev, dtype)
    hist = torch.empty(n, b, *shape, device=dev)
    inp = torch.empty(2 * b, *shape, device=dev, dtype=dtype)

    def loop() -> None:
        inp.copy_(torch.cat([x0, x0]))
        for j in range(n):
            fused_olss_step(torch.tanh(weights * inp), coeffs, j, x0, hist, inp, g, backend="triton")

    def eager(c: torch.Tensor, gv: float, noise: torch.Tensor) -> torch.Tensor:
        h: list[torch.Tensor] = []
        x = torch.cat([noise, noise]).to(dtype)
        for j in range(n):
            mo = torch.tanh(weights * x).double()
            e = mo[:b] + gv * (mo[b:] - mo[:b])
            h.append(e)
            nxt = c[j, 0].double() * noise.double() + sum(c[j, i + 1].double() * h[i] for i in range(j + 1))
            x = torch.cat([nxt, nxt]).to(dtype)
        return x

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        loop()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loop()
    for trial in range(3):
        c = (torch.randn(n, n + 1, generator=gen) * 0.3).tril(1).to(dev)
        gv = 1.0 + 0.75 * trial
        noise = torch.randn(b, *shape, generator=gen).to(dev)
        coeffs.copy_(c)
        g.fill_(gv)
        x0.copy_(noise)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(inp.double(), eager(c, gv, noise).double(), rtol=1e-2, atol=2e-2)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--run-triton":
        _child_main(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} --run-triton IN.pt OUT.pt (normally started by pytest)")
