"""The denoise graph: one ONNX ``Loop`` over the n steps with the UNet as its body (see :mod:`olss_fast.export.onnx_export`),
and the UNet cut back out of it for TensorRT."""
from __future__ import annotations

import copy
from typing import Any, Optional

import numpy as np


PREFIX = "olss/"  # names of every value and node the loop construction adds (never used by the exporters)


# ==================================================================================================== ONNX helpers
def tensor_elem(dtype: str) -> int:
    from onnx import TensorProto

    return {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[dtype]


def static_dims(value_info: Any) -> Optional[list[int]]:
    """The shape of a graph input/output, or ``None`` if any dimension is symbolic/unknown."""
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    dims = []
    for d in t.shape.dim:
        if not d.HasField("dim_value") or d.dim_value <= 0:
            return None
        dims.append(int(d.dim_value))
    return dims


# ==================================================================================================== the loop graph
def build_denoise_model(
    unet_model: Any,
    *,
    coeffs: np.ndarray,
    timesteps: np.ndarray,
    guidance_scale: Optional[float],
    latent_shape: tuple[int, ...],
    dtype: str,
    cond: list[tuple[str, int, tuple[int, ...]]],
) -> Any:
    """Wrap a one-call denoiser model into the n-step OLSS loop (an ONNX ``Loop``; its weights stay stored once).

    ``unet_model`` must have inputs ``olss/unet_sample`` (``[M, ...]``, ``dtype``), ``olss/unet_timestep``
    (0-d, the timesteps' type) and the conditioning inputs ``cond`` (``(name, ONNX element type, shape)`` each), and
    the output ``olss/unet_out`` (``[M, ...]``). ``guidance_scale=None`` means no classifier-free guidance
    (``M = B``); otherwise ``M = 2B``, uncond half first. The result has inputs ``noise`` (``latent_shape``,
    ``dtype``) and the conditioning inputs (read by the loop body from the outer scope), and the output ``latents``.
    """
    from onnx import TensorProto, helper, numpy_helper

    coeffs = np.ascontiguousarray(coeffs, dtype=np.float32)
    n = int(coeffs.shape[-2])
    if coeffs.shape[-1] != n + 1 or coeffs.ndim not in (2, 3):
        raise ValueError(f"coeffs must be [n, n+1] or [C, n, n+1], got {list(coeffs.shape)}")
    timesteps = np.asarray(timesteps)
    if timesteps.shape != (n,):
        raise ValueError(f"{n} steps need {n} timesteps, got shape {list(timesteps.shape)}")
    lat = [int(v) for v in latent_shape]
    r = len(lat)
    b = lat[0]
    guided = guidance_scale is not None
    elem = tensor_elem(dtype)
    fp = TensorProto.FLOAT
    P = PREFIX

    for node in unet_model.graph.node:
        if node.name.startswith(P) or any(o.startswith(P) and o != P + "unet_out" for o in node.output):
            raise ValueError(f"UNet node {node.name!r} uses the reserved prefix {P!r}")

    inits = [
        numpy_helper.from_array(coeffs, P + "coeffs"),
        numpy_helper.from_array(timesteps, P + "timesteps"),
        numpy_helper.from_array(np.arange(n, dtype=np.int64), P + "step_ids"),
        numpy_helper.from_array(np.array(n, dtype=np.int64), P + "trip_count"),
        numpy_helper.from_array(np.array(True), P + "loop_cond"),
        numpy_helper.from_array(np.array([n] + lat, dtype=np.int64), P + "hist_shape"),
        numpy_helper.from_array(np.array([n] + [1] * r, dtype=np.int64), P + "slot_shape"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), P + "axis0"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), P + "zero1"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), P + "one1"),
        numpy_helper.from_array(np.array([n + 1], dtype=np.int64), P + "n_plus_1"),
    ]
    if guided:
        inits += [
            numpy_helper.from_array(np.array(guidance_scale, dtype=np.float32), P + "guidance"),
            numpy_helper.from_array(np.array([b, b], dtype=np.int64), P + "cfg_split"),
        ]
    node = helper.make_node
    body_nodes: list[Any] = []
    body_nodes.append(node("Gather", [P + "timesteps", P + "iter"], [P + "unet_timestep"], name=P + "timestep",
                           axis=0))
    x_model = P + "x"
    if dtype != "float32":
        body_nodes.append(node("Cast", [P + "x"], [P + "x_model"], name=P + "cast_in", to=elem))
        x_model = P + "x_model"
    if guided:
        body_nodes.append(node("Concat", [x_model, x_model], [P + "unet_sample"], name=P + "cfg_concat", axis=0))
    else:
        body_nodes.append(node("Identity", [x_model], [P + "unet_sample"], name=P + "unet_in"))
    body_nodes.extend(unet_model.graph.node)
    body_nodes.append(node("Cast", [P + "unet_out"], [P + "e_raw"], name=P + "cast_out", to=fp))
    if guided:
        body_nodes += [
            node("Split", [P + "e_raw", P + "cfg_split"], [P + "e_uncond", P + "e_cond"], name=P + "cfg_split",
                 axis=0),
            node("Sub", [P + "e_cond", P + "e_uncond"], [P + "e_diff"], name=P + "cfg_sub"),
            node("Mul", [P + "e_diff", P + "guidance"], [P + "e_scaled"], name=P + "cfg_mul"),
            node("Add", [P + "e_uncond", P + "e_scaled"], [P + "e"], name=P + "cfg_add"),
        ]
    else:
        body_nodes.append(node("Identity", [P + "e_raw"], [P + "e"], name=P + "no_cfg"))
    body_nodes += [
        # hist[j] = e
        node("Unsqueeze", [P + "e", P + "axis0"], [P + "e_slot"], name=P + "e_slot"),
        node("Equal", [P + "step_ids", P + "iter"], [P + "slot_mask"], name=P + "slot_mask"),
        node("Reshape", [P + "slot_mask", P + "slot_shape"], [P + "slot_mask_b"], name=P + "slot_mask_b"),
        node("Where", [P + "slot_mask_b", P + "e_slot", P + "hist"], [P + "hist_next"], name=P + "hist_write"),
    ]
    # row j of the coefficients -> w_j (broadcasts against x0) and v_j (broadcasts against hist)
    if coeffs.ndim == 2:
        inits.append(numpy_helper.from_array(np.array([n] + [1] * r, dtype=np.int64), P + "v_shape"))
        body_nodes += [
            node("Gather", [P + "coeffs", P + "iter"], [P + "row"], name=P + "row", axis=0),
            node("Slice", [P + "row", P + "zero1", P + "one1", P + "axis0"], [P + "w"], name=P + "w"),
            node("Slice", [P + "row", P + "one1", P + "n_plus_1", P + "axis0"], [P + "v"], name=P + "v"),
            node("Reshape", [P + "v", P + "v_shape"], [P + "v_b"], name=P + "v_b"),
        ]
    else:
        c = int(coeffs.shape[0])
        if r < 2 or lat[1] != c:
            raise ValueError(f"per-channel coeffs for {c} channels, latents {lat}")
        inits += [
            numpy_helper.from_array(np.array([1, c] + [1] * (r - 2), dtype=np.int64), P + "w_shape"),
            numpy_helper.from_array(np.array([n, 1, c] + [1] * (r - 2), dtype=np.int64), P + "v_shape"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), P + "axis1"),
        ]
        body_nodes += [
            node("Gather", [P + "coeffs", P + "iter"], [P + "row"], name=P + "row", axis=1),  # [C, n+1]
            node("Slice", [P + "row", P + "zero1", P + "one1", P + "axis1"], [P + "w_c"], name=P + "w_c"),
            node("Reshape", [P + "w_c", P + "w_shape"], [P + "w"], name=P + "w"),
            node("Slice", [P + "row", P + "one1", P + "n_plus_1", P + "axis1"], [P + "v_c"], name=P + "v_c"),
            node("Transpose", [P + "v_c"], [P + "v_t"], name=P + "v_t", perm=[1, 0]),  # [n, C]
            node("Reshape", [P + "v_t", P + "v_shape"], [P + "v_b"], name=P + "v_b"),
        ]
    body_nodes += [
        node("Mul", [P + "w", P + "x0"], [P + "wx"], name=P + "wx"),
        node("Mul", [P + "v_b", P + "hist_next"], [P + "vh"], name=P + "vh"),
        node("ReduceSum", [P + "vh", P + "axis0"], [P + "ve"], name=P + "ve", keepdims=0),
        node("Add", [P + "wx", P + "ve"], [P + "x_next"], name=P + "x_next"),
        node("Identity", [P + "loop_cond_in"], [P + "loop_cond_out"], name=P + "loop_cond_out"),
    ]
    hist_shape = [n] + lat
    body = helper.make_graph(
        body_nodes, P + "step",
        inputs=[
            helper.make_tensor_value_info(P + "iter", TensorProto.INT64, []),
            helper.make_tensor_value_info(P + "loop_cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info(P + "x", fp, lat),
            helper.make_tensor_value_info(P + "hist", fp, hist_shape),
        ],
        outputs=[
            helper.make_tensor_value_info(P + "loop_cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info(P + "x_next", fp, lat),
            helper.make_tensor_value_info(P + "hist_next", fp, hist_shape),
        ],
    )
    outer_nodes = [
        node("Cast", ["noise"], [P + "x0"], name=P + "x0", to=fp),
        node("ConstantOfShape", [P + "hist_shape"], [P + "hist0"], name=P + "hist0",
             value=numpy_helper.from_array(np.zeros(1, dtype=np.float32))),
        node("Loop", [P + "trip_count", P + "loop_cond", P + "x0", P + "hist0"], [P + "x_final", P + "hist_final"],
             name=P + "loop", body=body),
        node("Cast", [P + "x_final"], ["latents"], name=P + "latents", to=elem),
    ]
    graph = helper.make_graph(
        outer_nodes, "olss_denoise",
        inputs=[helper.make_tensor_value_info("noise", elem, lat)]
        + [helper.make_tensor_value_info(name, cond_elem, list(shape)) for name, cond_elem, shape in cond],
        outputs=[helper.make_tensor_value_info("latents", elem, lat)],
        initializer=list(unet_model.graph.initializer) + inits,
    )
    graph.sparse_initializer.extend(unet_model.graph.sparse_initializer)
    model = helper.make_model(graph, opset_imports=list(unet_model.opset_import),
                              producer_name=unet_model.producer_name, producer_version=unet_model.producer_version)
    model.ir_version = unet_model.ir_version
    model.functions.extend(unet_model.functions)
    return model


def _names_read(graph: Any) -> set[str]:
    """Every value name read by the nodes of ``graph`` and of its subgraphs."""
    names: set[str] = set()
    for nd in graph.node:
        names.update(i for i in nd.input if i)
        for attr in nd.attribute:
            if attr.g is not None and attr.HasField("g"):
                names |= _names_read(attr.g)
            for g in attr.graphs:
                names |= _names_read(g)
    return names


def extract_unet_model(denoise_model: Any) -> Any:
    """Cut the one-call UNet back out of a ``denoise.onnx`` loop (for TensorRT), weights shared, not copied twice.

    The result has inputs ``olss/unet_sample`` ``[M, ...]``, ``olss/unet_timestep`` (0-d) and the conditioning
    inputs of the loop, and the output ``olss/unet_out``.
    """
    from onnx import helper

    P = PREFIX
    loops = [nd for nd in denoise_model.graph.node if nd.op_type == "Loop" and nd.name == P + "loop"]
    if len(loops) != 1:
        raise ValueError("not an olss_fast denoise model: no 'olss/loop' node")
    body = next(a.g for a in loops[0].attribute if a.name == "body")
    unet_nodes = [nd for nd in body.node if not nd.name.startswith(P)]
    outer_inputs = {v.name: v for v in denoise_model.graph.input}
    inits = {t.name: t for t in denoise_model.graph.initializer}
    noise = outer_inputs["noise"]
    conds = [v for name, v in outer_inputs.items() if name != "noise"]
    m = static_dims(conds[0])[0]  # type: ignore[index]
    lat = static_dims(noise)
    assert lat is not None
    sample_shape = [m] + lat[1:]
    elem = noise.type.tensor_type.elem_type
    t_elem = inits[P + "timesteps"].data_type
    read = _names_read(helper.make_graph(unet_nodes, "tmp", [], []))
    graph = helper.make_graph(
        unet_nodes, "olss_unet",
        inputs=[
            helper.make_tensor_value_info(P + "unet_sample", elem, sample_shape),
            helper.make_tensor_value_info(P + "unet_timestep", t_elem, []),
            *[copy.deepcopy(c) for c in conds],
        ],
        outputs=[helper.make_tensor_value_info(P + "unet_out", elem, sample_shape)],
        initializer=[t for name, t in inits.items() if name in read and not name.startswith(P)],
    )
    model = helper.make_model(graph, opset_imports=list(denoise_model.opset_import),
                              producer_name=denoise_model.producer_name)
    model.ir_version = denoise_model.ir_version
    model.functions.extend(denoise_model.functions)
    model.metadata_props.extend(denoise_model.metadata_props)
    return model
