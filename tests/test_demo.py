"""`olss-fast demo` end to end in a reduced mode; its printed table shows the numbers in its JSON; bad input."""
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest

from olss_fast.cli import main
from olss_fast.demo import DemoConfig, run_demo

SMALL = ["--teacher-steps", "10", "--steps", "2", "3", "--samplers", "olss", "ddim", "dpmsolver++", "pndm",
         "--train-classes", "0", "1", "--eval-classes", "7", "8", "--train-seeds", "3", "--eval-seeds", "4",
         "--grid-nfe", "3", "--quiet"]


def test_demo_reduced_run_writes_everything_and_prints_its_json(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert (out / "grid.png").stat().st_size > 0 and (out / "quality.png").stat().st_size > 0
    assert results["nfe"] == [2, 3] and set(results["samplers"]) == {"olss", "ddim", "dpmsolver++", "pndm"}
    assert set(results["schedules"]) == {"2", "3"}
    # every number of the RMSE block printed equals the JSON's, as formatted
    block = printed.split("RMSE vs teacher")[1].split("PSNR")[0]
    for name, per in results["samplers"].items():
        row = re.search(rf"^\s+{re.escape(name)}\s+(.*)$", block, re.M).group(1).split()
        assert row == [f"{per[str(n)]['rmse']:.4f}" if per[str(n)] else "-" for n in (2, 3)]
    assert f"{results['teacher']['fd']:.3f}" in printed
    for name, per in results["samplers"].items():
        for n, m in per.items():
            if m is None:  # a sampler that cannot run at exactly this NFE (PNDM at 2: its first step costs 2)
                assert name == "pndm" and n == "2"
                continue
            assert 0 <= m["accuracy"] <= 1 and m["rmse"] >= 0 and m["fd"] >= 0
    assert results["samplers"]["olss"]["3"]["rmse"] < results["samplers"]["ddim"]["3"]["rmse"]


def test_demo_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown sampler"):
        run_demo(DemoConfig(samplers=("olss", "heun"), out=str(tmp_path / "a")))
    with pytest.raises(ValueError, match="steps must be an integer in"):
        run_demo(DemoConfig(steps=(0, 2), out=str(tmp_path / "b")))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        run_demo(DemoConfig(out=str(blocker)))
    with pytest.raises(ValueError, match="cannot be created"):
        run_demo(DemoConfig(out=str(blocker / "sub")))
    if os.geteuid() != 0:  # root writes into read-only folders
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(ValueError, match="not writable"):
            run_demo(DemoConfig(out=str(ro / "out")))


def test_demo_refuses_corrupted_weights_and_writes_nothing(tmp_path):
    import olss_fast.models.digits as digits

    model = tmp_path / "model"
    shutil.copytree(Path(digits.__file__).parent / "digits", model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors"):
        run_demo(DemoConfig(model_path=str(model), out=str(out)))
    assert not out.exists()


def test_demo_optional_learned_step_rows_and_search_budget(tmp_path, caplog):
    """The learned-timestep baselines and OLSS on the uniform path are extra rows of the same table; the
    reduced search budget is validated. The demo's own OLSS schedulers go through use_olss_scheduler's checks
    (regression: the demo ran them by a plain swap and warned that they were unchecked)."""
    config = DemoConfig(teacher_steps=10, steps=(2, 3), samplers=("olss", "olss-uniform", "oss-ddim", "ddim"),
                        train_classes=(0, 1), eval_classes=(7, 8), train_seeds=3, eval_seeds=4, grid_nfe=3,
                        search_samples=4, search_stride=1, oss_samples=4, out=str(tmp_path / "demo"))
    with caplog.at_level(logging.WARNING, logger="olss_fast"):
        results = run_demo(config, progress=False)
    assert "without olss_fast.use_olss_scheduler" not in caplog.text
    assert set(results["samplers"]) == {"olss", "olss-uniform", "oss-ddim", "ddim"}
    for name in ("olss-uniform", "oss-ddim"):
        assert all(results["samplers"][name][n]["rmse"] > 0 for n in ("2", "3"))
    assert results["teacher"]["sampler"] == "DPMSolverMultistepScheduler-10"
    assert results["time_s"]["fit_all"] >= results["time_s"]["search"]
    with pytest.raises(ValueError, match="search_stride 5 leaves fewer than 3"):
        run_demo(DemoConfig(teacher_steps=10, steps=(2, 3), grid_nfe=3, search_stride=5, out=str(tmp_path / "b")))
    with pytest.raises(ValueError, match="oss_samples must be a positive integer"):
        run_demo(DemoConfig(oss_samples=0, out=str(tmp_path / "c")))
