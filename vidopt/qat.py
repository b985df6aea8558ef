"""Quantization-aware training forms of the student: fake-quantization that simulates onnxruntime's static QDQ int8,
and the plain student's weights back from a QAT model. Used by the quantize stage through a training job."""
from __future__ import annotations

import copy

import torch
from torch import nn

from vidopt.models import StudentArch
from vidopt.onnx_utils import INT8_WEIGHT_MAX


def qconfig_mapping():
    """Fake-quantization that simulates what onnxruntime's static QDQ quantization does to this model: uint8
    asymmetric activations (full range), symmetric per-channel weights on quantize_int8's 7-bit grid
    (-INT8_WEIGHT_MAX..INT8_WEIGHT_MAX)."""
    from torch.ao.quantization import (FakeQuantize, MovingAverageMinMaxObserver,
                                       MovingAveragePerChannelMinMaxObserver, QConfig, QConfigMapping)

    activation = FakeQuantize.with_args(observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                                        dtype=torch.quint8, qscheme=torch.per_tensor_affine)
    weight = FakeQuantize.with_args(observer=MovingAveragePerChannelMinMaxObserver, quant_min=-INT8_WEIGHT_MAX,
                                    quant_max=INT8_WEIGHT_MAX, dtype=torch.qint8,
                                    qscheme=torch.per_channel_symmetric, ch_axis=0)
    return QConfigMapping().set_global(QConfig(activation=activation, weight=weight))


def prepare_qat(student: nn.Module, arch: StudentArch) -> nn.Module:
    """A copy of the student whose encoder and head are FX-prepared for QAT: Conv+BN+ReLU fused with fake-quantized
    folded weights, fake-quant on every activation onnxruntime quantizes. The stem's input is 8 bits in both, but
    not alike: the int8 file reads the uint8 pixels of x_t and x_{t+1} (DeployedStudent(pixel_input=True)), QAT
    fake-quantizes the (x_t, x_{t+1} - x_t) that training sees; both 8 bits per tensor, so the noise QAT adapts to is
    of the same size. The two parts are traced separately because
    the student's [B, C, T, H, W] -> [B*T, C, H, W] reshape unpacks x.shape, which FX cannot trace; the reshapes move
    data only, and int8 tensors pass through them unchanged in onnxruntime as well."""
    from torch.ao.nn.intrinsic.qat import freeze_bn_stats
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    qat = copy.deepcopy(student).train()
    frames = torch.randn(2, arch.input_channels(), arch.height, arch.width)  # what the encoder reads per frame
    qat.encoder = prepare_qat_fx(qat.encoder, qconfig_mapping(), (frames,))
    qat.head = prepare_qat_fx(qat.head, qconfig_mapping(), (torch.randn(2, arch.feature_dim(), arch.frames),))
    # The student arrives trained: its BN statistics are right, and freezing them makes the fake-quantized folded
    # weights the ones onnxruntime will fold and quantize.
    return qat.apply(freeze_bn_stats)


def student_state_from_qat(qat: nn.Module) -> dict[str, torch.Tensor]:
    """The plain student's state dict from a QAT model: fake-quant state dropped; a fused Conv+BN(+ReLU) module at
    index k of its Sequential holds the conv weight, and its `.bn` was the student's module k + 1."""
    state = {}
    for key, value in qat.state_dict().items():
        if "fake_quant" in key or "activation_post_process" in key:
            continue
        prefix, sep, rest = key.partition(".bn.")
        if sep:
            parent, index = prefix.rsplit(".", 1)
            key = f"{parent}.{int(index) + 1}.{rest}"
        state[key] = value
    return state
