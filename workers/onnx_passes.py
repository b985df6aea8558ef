"""ONNX graph rewrites for the GPU target, with `onnx` and numpy only (no onnxruntime, no TensorRT needed).

- `to_fp16`: every float tensor of the graph in fp16, with a Cast at the fp32 input and output, so callers feed and
  read fp32 as with every other artifact. onnxconverter-common does this too but is not a dependency here; the
  student's graph has few op types, so a whitelist keeps the pass short and refuses graphs it was not checked on.
- `to_tensorrt_int8`: the quantize stage's QDQ model uses uint8 activations with zero points (faster in onnxruntime's
  CPU kernels, see vidopt/onnx_utils.py), but TensorRT accepts only symmetric int8 activations (zero point 0, range
  [-128, 127]) and int8 Q/DQ only. The calibrated range of each activation is kept: [s*(0-z), s*(255-z)] becomes a
  symmetric int8 scale max(|lo|, |hi|) / 127, so no calibration data is needed. onnxruntime's quantizer drops a Relu
  whose output range starts at 0 (the uint8 clamp at zero point 0 *is* the ReLU); a symmetric int8 range keeps
  negatives, so the Relu goes back in front of those QuantizeLinear nodes. int32 bias DequantizeLinear nodes are
  folded into float biases (TensorRT computes the bias in float anyway). A pixel model's uint8 input is cast to
  float and quantized to int8 where it enters the stem (`_float_pixels_for_tensorrt`). Weights the quantize stage stores
  compactly (a packed body's block-diagonal convs: one block, rebuilt by Pad and Concat) are folded back into whole
  initializers first, so TensorRT sees every weight DequantizeLinear reading a constant (`_fold_constant_weights`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from vidopt.storage import atomic_path

# Op types checked to accept fp16 for every float input and to keep their meaning when all float tensors are fp16.
FP16_OPS = {"Conv", "Relu", "AveragePool", "MaxPool", "GlobalAveragePool", "Gemm", "MatMul", "Add", "Mul", "Sub",
            "Div", "BatchNormalization", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Concat",
            "Identity", "Constant", "Cast", "Shape", "Gather", "Slice"}


def _save(model: onnx.ModelProto, dest: Path) -> Path:
    onnx.checker.check_model(model, full_check=True)
    with atomic_path(Path(dest)) as tmp:
        onnx.save(model, str(tmp))
    return Path(dest)


def _rename_uses(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]


def to_fp16(src: str | Path, dest: str | Path) -> Path:
    model = onnx.load(str(src))
    graph = model.graph
    unknown = {n.op_type for n in graph.node} - FP16_OPS
    if unknown:
        raise ValueError(f"to_fp16: {src}: op types {sorted(unknown)} are not checked for fp16; extend FP16_OPS "
                         f"after checking the ONNX spec for them")
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.name == "value" and attr.t.data_type == TensorProto.FLOAT:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float16)))
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = TensorProto.FLOAT16
    for info in graph.value_info:
        if info.type.tensor_type.elem_type == TensorProto.FLOAT:
            info.type.tensor_type.elem_type = TensorProto.FLOAT16

    casts_in, casts_out = [], []
    initializers = {i.name for i in graph.initializer}
    for inp in graph.input:   # fp32 in -> Cast -> fp16 inside
        if inp.name not in initializers and inp.type.tensor_type.elem_type == TensorProto.FLOAT:
            _rename_uses(graph, inp.name, f"{inp.name}_fp16")
            casts_in.append(helper.make_node("Cast", [inp.name], [f"{inp.name}_fp16"], to=TensorProto.FLOAT16,
                                             name=f"{inp.name}_to_fp16"))
    for out in graph.output:  # fp16 inside -> Cast -> fp32 out
        if out.type.tensor_type.elem_type == TensorProto.FLOAT:
            inner = f"{out.name}_fp16"
            _rename_uses(graph, out.name, inner)
            for node in graph.node:
                node.output[:] = [inner if name == out.name else name for name in node.output]
            casts_out.append(helper.make_node("Cast", [inner], [out.name], to=TensorProto.FLOAT,
                                              name=f"{out.name}_to_fp32"))
    nodes = casts_in + list(graph.node) + casts_out
    del graph.node[:]
    graph.node.extend(nodes)
    return _save(model, Path(dest))


def _float_pixels_for_tensorrt(graph: onnx.GraphProto, inits: dict[str, onnx.TensorProto]) -> None:
    """A pixel model (vidopt.onnx_utils.takes_pixels) moves uint8 pixels through Reshape / Pad / Gather into a
    DequantizeLinear that nothing quantized; TensorRT takes uint8 only at the network's edge and in Cast, and int8 only
    from its own Q/DQ. So: one Cast to float right after the uint8 input, float constants beside it, and a
    QuantizeLinear in front of that DequantizeLinear with the (already symmetric) scale the loop above gave it. The
    file still reads uint8 pixels, like the onnxruntime one."""
    source = graph.input[0]
    if source.type.tensor_type.elem_type != TensorProto.UINT8:
        return
    quantized = {out for node in graph.node if node.op_type == "QuantizeLinear" for out in node.output}
    entries = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] not in inits
               and n.input[0] not in quantized]
    as_float = f"{source.name}_float"
    _rename_uses(graph, source.name, as_float)
    nodes = [helper.make_node("Cast", [source.name], [as_float], to=TensorProto.FLOAT, name=as_float)]
    for node in graph.node:
        for name in node.input:
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear") and name in inits \
                    and inits[name].data_type == TensorProto.UINT8:
                inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name]).astype(np.float32),
                                                             name))
        if node in entries:
            requantized = f"{node.input[0]}_int8"
            nodes.append(helper.make_node("QuantizeLinear", [node.input[0], *node.input[1:]], [requantized],
                                          name=requantized))
            node.input[0] = requantized
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]   # it typed the moved tensors uint8; the checker infers them again


def _fold_constant_weights(graph: onnx.GraphProto) -> None:
    """Pad (constant mode, zeros) and Concat nodes reading only initializers, computed here into initializers."""
    inits = {i.name: i for i in graph.initializer}
    kept = []
    for node in graph.node:
        if node.op_type not in ("Pad", "Concat") or not all(name in inits for name in node.input if name):
            kept.append(node)
            continue
        arrays = [numpy_helper.to_array(inits[name]) for name in node.input if name]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Concat":
            value = np.concatenate(arrays, axis=attrs["axis"])
        else:
            data, pads = arrays[0], arrays[1]
            if attrs.get("mode", b"constant") != b"constant" or len(arrays) > 3 or len(arrays) == 3 and arrays[2].any():
                raise ValueError(f"{node.name}: only zero padding of constants over all axes is folded")
            value = np.pad(data, list(zip(pads[:data.ndim], pads[data.ndim:])))
        folded = numpy_helper.from_array(value, node.output[0])
        graph.initializer.append(folded)
        inits[node.output[0]] = folded
    del graph.node[:]
    graph.node.extend(kept)


def to_tensorrt_int8(src: str | Path, dest: str | Path) -> Path:
    model = onnx.load(str(src))
    graph = model.graph
    _fold_constant_weights(graph)
    inits = {i.name: i for i in graph.initializer}

    def replace(name: str, array: np.ndarray) -> None:
        inits[name].CopyFrom(numpy_helper.from_array(array, name))

    pairs = {(n.input[1], n.input[2]) for n in graph.node
             if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) == 3
             and n.input[2] in inits and inits[n.input[2]].data_type == TensorProto.UINT8}
    # uint8 zero point 0: the range starts at 0, the quantizer dropped the Relu before it (read before rewriting)
    clamps_at_zero = {zero for _, zero in pairs if not numpy_helper.to_array(inits[zero]).any()}
    for scale_name, zero_name in pairs:
        scale = numpy_helper.to_array(inits[scale_name]).astype(np.float64)
        zero = numpy_helper.to_array(inits[zero_name]).astype(np.float64)
        bound = np.maximum(np.abs(scale * (0 - zero)), np.abs(scale * (255 - zero)))
        symmetric = np.where(bound > 0, bound / 127.0, scale)  # a never-active tensor keeps its (unused) scale
        replace(scale_name, symmetric.astype(np.float32))
        replace(zero_name, np.zeros(zero.shape, np.int8))

    kept, relus = [], set()
    for node in graph.node:
        values = node.input[0] if node.input else ""
        if node.op_type == "QuantizeLinear" and len(node.input) == 3 and node.input[2] in clamps_at_zero:
            if values not in relus:   # one Relu per tensor, however many QuantizeLinear nodes read it
                kept.append(helper.make_node("Relu", [values], [f"{values}_relu"], name=f"{values}_relu"))
                relus.add(values)
            node.input[0] = f"{values}_relu"
            kept.append(node)
        elif node.op_type == "DequantizeLinear" and values in inits and inits[values].data_type == TensorProto.INT32:
            q = numpy_helper.to_array(inits[values]).astype(np.float64)
            scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
            zero = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64) if len(node.input) == 3 else 0.0
            graph.initializer.append(numpy_helper.from_array(((q - zero) * scale).astype(np.float32), node.output[0]))
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    _float_pixels_for_tensorrt(graph, inits)
    used = {name for node in graph.node for name in node.input}
    live = [i for i in graph.initializer if i.name in used]  # drop the int32 bias and its scale / zero point
    del graph.initializer[:]
    graph.initializer.extend(live)
    return _save(model, Path(dest))
