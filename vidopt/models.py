"""Teacher and student models, each rebuilt from a small JSON architecture record (`arch.json`), never from a pickle.

Teacher: torchvision's video ResNets (r3d_18, mc3_18, r2plus1d_18) with a width multiplier, built in vidopt.teacher_net;
at width 1.0 they are the standard architectures, so torchvision checkpoints load as they are.
Student: a per-frame 2D CNN encoder and a temporal Conv1d head — only ops every target runs well (no Conv3d, no
adaptive pooling; see DESIGN.md), and per-layer widths in the record so a pruned student rebuilds anywhere.
"""
from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from vidopt.data import KINETICS_MEAN, KINETICS_STD

PIXEL_MAX = 255   # uint8 pixels; the value of DeployedStudent's constant plane


class TeacherArch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["teacher"] = "teacher"
    arch: Literal["r3d_18", "mc3_18", "r2plus1d_18"] = "r2plus1d_18"
    width: float = 1.0                      # multiplier on every channel count; 1.0 = the published model
    frame_differences: bool = False         # 6-channel input as the student's (torchvision checkpoints need False)
    num_classes: int = 400


class StudentArch(BaseModel):
    """A student's record. Its defaults keep what records written before a field existed meant (a 3x3 stem); the
    pipeline's student is DistillConfig's (vidopt/config.py)."""
    model_config = ConfigDict(extra="forbid")
    kind: Literal["student"] = "student"
    frames: int = 16                        # T: the temporal head pools over exactly T steps
    height: int = 112
    width: int = 112
    conv_widths: list[int] = Field(default_factory=lambda: [16, 32, 64, 128])   # per Conv2d, in order
    conv_strides: list[int] = Field(default_factory=lambda: [2, 2, 2, 2])       # per Conv2d
    stem_kernel: int = 3                    # the first conv's: odd = padded to keep the map (stride aside), as the
    #                                         3x3 rest; = its stride: non-overlapping patches, unpadded (patchify)
    temporal_widths: list[int] = Field(default_factory=lambda: [128])          # per temporal Conv1d
    temporal_kernel: int = 3
    pool_grid: int = 2                      # encoder output averaged to a grid x grid map, then flattened
    frame_differences: bool = True          # the encoder sees each frame and its difference to the next frame
    num_classes: int = 400

    @model_validator(mode="after")
    def _stem_fits_its_stride(self) -> "StudentArch":
        self.conv_geometry(0)
        return self

    def input_channels(self) -> int:
        """Channels of one frame as the encoder takes it: RGB, then (with frame_differences) the RGB difference."""
        return 6 if self.frame_differences else 3

    def conv_geometry(self, index: int) -> tuple[int, int]:
        """(kernel, padding) of encoder conv `index`: 3x3 padded by 1, but for the stem's stem_kernel."""
        kernel = self.stem_kernel if index == 0 else 3
        if kernel % 2:
            return kernel, kernel // 2
        if kernel != self.conv_strides[0]:
            raise ValueError(f"student: stem_kernel={kernel} must be odd (a padded conv) or equal to the stem's "
                             f"stride {self.conv_strides[0]} (non-overlapping patches)")
        return kernel, 0

    def final_map(self) -> tuple[int, int]:
        """Feature-map size after the encoder: each conv maps n to (n + 2 padding - kernel) // stride + 1."""
        h, w = self.height, self.width
        for i, s in enumerate(self.conv_strides):
            kernel, padding = self.conv_geometry(i)
            h, w = (h + 2 * padding - kernel) // s + 1, (w + 2 * padding - kernel) // s + 1
        return h, w

    def pool_window(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(kernel, stride) of the AvgPool2d giving exactly a grid x grid map from the final feature map. Windows
        overlap where the map does not divide (7x7 -> 2x2: kernel 4, stride 3), so every position counts."""
        h, w = self.final_map()
        if min(h, w) < self.pool_grid:
            raise ValueError(f"student: final feature map {h}x{w} is smaller than pool_grid={self.pool_grid}")
        stride = (h // self.pool_grid, w // self.pool_grid)
        kernel = (h - (self.pool_grid - 1) * stride[0], w - (self.pool_grid - 1) * stride[1])
        return kernel, stride

    def feature_dim(self) -> int:
        return self.conv_widths[-1] * self.pool_grid**2


def conv_bn_relu_2d(cin: int, cout: int, stride: int, kernel: int = 3, padding: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def with_frame_differences(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W] -> [B, 6, T, H, W]: each frame, then its difference to the next frame (zeros for the last).

    TSN's RGB-difference input. The classes differ only in motion, and a per-frame encoder has to find motion by
    comparing features of separate frames; given the difference it sees motion in every frame. On the demo data, at
    2000 steps of cross-entropy, it took the student from 60% to 85% test top-1, and off chance after 200 steps
    instead of ~1000. Parameter-free: on the FPGA target the host computes it before the encoder IP."""
    following = torch.cat([x[:, :, 1:], x[:, :, -1:]], dim=2)  # each frame's next; the last frame is its own
    return torch.cat([x, following - x], dim=1)                 # Slice / Concat / Sub only: no shape arithmetic


class FrameEncoder(nn.Module):
    """Per-frame 2D CNN: [N, C, H, W] -> [N, D], D = width * grid^2. Pooling is a fixed-size AvgPool2d to a small grid,
    not adaptive pooling (hls4ml rejects it). A grid, not a single global average, because motion classes (left vs
    right, in vs out) need to know *where* things are in each frame; a 1x1 grid would leave only padding cues."""

    def __init__(self, spec: StudentArch):
        super().__init__()
        layers, cin = [], spec.input_channels()
        for i, (cout, stride) in enumerate(zip(spec.conv_widths, spec.conv_strides, strict=True)):
            layers.append(conv_bn_relu_2d(cin, cout, stride, *spec.conv_geometry(i)))
            cin = cout
        self.convs = nn.Sequential(*layers)
        kernel, stride = spec.pool_window()
        # A 1x1 window (a final map already grid x grid) averages nothing: no op at all, where onnxruntime's int8
        # average pool would still cost ~25 us of a ~250 us model
        self.pool = nn.Identity() if kernel == (1, 1) else nn.AvgPool2d(kernel, stride)
        self.flatten = nn.Flatten()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.pool(self.convs(x)))


class TemporalHead(nn.Module):
    """[B, D, T] -> logits [B, classes]: temporal Conv1d layers, AvgPool1d over all T steps, Linear."""

    def __init__(self, spec: StudentArch):
        super().__init__()
        layers, cin = [], spec.feature_dim()
        for cout in spec.temporal_widths:
            layers += [nn.Conv1d(cin, cout, spec.temporal_kernel, padding=spec.temporal_kernel // 2, bias=False),
                       nn.BatchNorm1d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.convs = nn.Sequential(*layers)
        self.pool = nn.AvgPool1d(spec.frames)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(self.pool(self.convs(x))))


class Student(nn.Module):
    def __init__(self, spec: StudentArch):
        super().__init__()
        self.frames = spec.frames
        self.frame_differences = spec.frame_differences
        self.encoder = FrameEncoder(spec)
        self.head = TemporalHead(spec)

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised clips [B, 3, T, H, W] -> what the encoder reads per frame, [B, C', T, H, W]."""
        return with_frame_differences(x) if self.frame_differences else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encoder_input(x)
        b, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(b * t, c, h, w)       # [B, C, T, H, W] -> [B*T, C, H, W]
        features = self.encoder(frames)                           # [B*T, D], D = width * grid^2
        features = features.reshape(b, t, -1).transpose(1, 2)     # -> [B, D, T]
        return self.head(features)


def has_pool(student: Student) -> bool:
    """Whether the student's encoder averages its final map (FrameEncoder: not where it is already the grid)."""
    return isinstance(student.encoder.pool, nn.AvgPool2d)


class DeployedStudent(nn.Module):
    """The inference form of a trained student: the same function in fewer, cheaper ops (for ONNX export).

    Student.forward builds the encoder input with Slice / Sub / Concat / Transpose over the whole clip; on
    onnxruntime CPU that data movement was a quarter of the demo student's batch-1 latency. Here one Gather picks the
    planes the stem reads, and the frame difference moves into the stem's weights: a conv is linear, so
    W_a * x_t + W_b * (x_{t+1} - x_t) = (W_a - W_b) * x_t + W_b * x_{t+1} (RepVGG-style re-parameterisation, with the
    stem's BatchNorm folded in too; equal up to float rounding).
    `channel_multiple` pads the stem's input channels to a multiple of it by repeating a plane under zero weights (int8
    conv kernels need multiples of 4). `frames_per_stem` = G > 1 runs G consecutive frames' stems as one conv: input
    the planes of frames t..t+G (each frame's next one included), output G blocks of the stem's channels, frame-major,
    which a Reshape turns back into G frames. onnxruntime's int8 conv computes 64 output channels per pass and pays per
    input channel, so a 16-wide stem packed by 4 does the work of 4 frames in about the time of 2
    (onnx_utils.int8_stem_packings). `pool_as_conv` computes the feature pooling as a depthwise conv with constant
    weights 1 / window (the same average): onnxruntime's int8 average pool was 34 us of the demo int8 model's ~400
    (fp32's pool: 6 us), while its int8 depthwise conv has a fast kernel. `packed_body` = k runs the first k convs
    after a packed stem on the packed frames too, as block-diagonal convs (G*C -> G*O channels, the frames' blocks
    apart), and unpacks after them: a 16-wide conv leaves 3/4 of an int8 pass idle whatever its input, so the packed
    one does about as many multiply-adds on a quarter of the pixels, and the unpacking moves a smaller map (on the
    demo's pruned student, packing its second conv took int8 from 0.44 to 0.41 ms in the quantize stage's timing).
    `pixel_input` takes uint8 pixels [B, 3, T, H, W] and folds the normalisation into the stem (_weights_for_pixels):
    the int8 form, whose clip then needs no quantizing at run time."""

    def __init__(self, student: Student, channel_multiple: int = 1, frames_per_stem: int = 1,
                 pool_as_conv: bool = False, pixel_input: bool = False, packed_body: int = 0,
                 grouped_body: bool = False):
        super().__init__()
        student = copy.deepcopy(student).eval()
        conv, bn = student.encoder.convs[0][0], student.encoder.convs[0][1]
        t, pairs, g = student.frames, student.frame_differences, frames_per_stem
        if t % g:
            raise ValueError(f"DeployedStudent: frames_per_stem={g} does not divide the student's {t} frames")
        body = student.encoder.convs[1:]
        if packed_body and (g == 1 or packed_body > len(body)):
            raise ValueError(f"DeployedStudent: packed_body={packed_body} needs frames packed into the stem "
                             f"(frames_per_stem={g}) and at most the {len(body)} convs after it")
        if grouped_body and (g == 1 or packed_body):
            raise ValueError(f"DeployedStudent: grouped_body needs frames packed into the stem (frames_per_stem={g}) "
                             f"and no packed_body ({packed_body})")
        scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()   # eval-mode BN: y = scale * conv + shift
        weight = conv.weight.detach() * scale[:, None, None, None]           # [O, C', k, k], C' = 6 (or 3)
        # Per frame: the weights on its own 3 planes and (with frame differences) on its next frame's 3 planes.
        own, following = (weight[:, :3] - weight[:, 3:], weight[:, 3:]) if pairs else (weight, None)
        slots = g + 1 if pairs else g                                        # frames whose planes one stem conv reads
        read = 3 * slots + (1 if pixel_input else 0)                         # + the constant plane (below)
        per_conv = read + (-read) % channel_multiple
        out = weight.shape[0]
        packed = weight.new_zeros(g * out, per_conv, *weight.shape[2:])      # block j = frame j of the group
        for j in range(g):
            packed[j * out:(j + 1) * out, 3 * j:3 * j + 3] = own
            if pairs:
                packed[j * out:(j + 1) * out, 3 * j + 3:3 * j + 6] = following
        if pixel_input:
            packed = self._weights_for_pixels(packed, 3 * slots)
        shift = (bn.bias - bn.running_mean * scale).detach()
        self.stem = nn.Conv2d(per_conv, g * out, conv.kernel_size, conv.stride, conv.padding, bias=True)
        self.stem.weight.data, self.stem.bias.data = packed, shift.repeat(g)
        self.stem_relu = nn.ReLU()
        # Input planes [B, 3*T, H, W] are channel-major (plane c*T + t); with pixel_input plane 3*T is the constant
        # one. Group of frames s..s+G-1 reads frames s..s+G (the last frame is its own next, as in
        # with_frame_differences), then the constant plane, then repeats of its first plane as padding.
        planes = []
        for first in range(0, t, g):
            reads = [c * t + min(frame, t - 1) for frame in range(first, first + slots) for c in range(3)]
            reads += [3 * t] if pixel_input else []
            planes += reads + [reads[0]] * (per_conv - len(reads))
        self.register_buffer("planes", torch.tensor(planes), persistent=False)
        self.frames_per_stem, self.per_conv = g, per_conv
        self.pixel_input = pixel_input
        packed_body = len(body) if grouped_body else packed_body
        self.packed = nn.Sequential(*[self._grouped(block, g) if grouped_body else self._block_diagonal(block, g)
                                      for block in body[:packed_body]])
        self.body, self.pool, self.flatten = body[packed_body:], student.encoder.pool, student.encoder.flatten
        self.head = student.head
        if pool_as_conv and has_pool(student):   # on packed channels too, where the whole body is packed: a
            #                                        depthwise conv is per channel
            channels = student.encoder.convs[-1][0].out_channels * (g if packed_body == len(body) else 1)
            self.pool = nn.Conv2d(channels, channels, self.pool.kernel_size, self.pool.stride, groups=channels,
                                  bias=False)
            self.pool.weight.data.fill_(1.0 / self.pool.weight[0, 0].numel())  # [C, 1, kh, kw]: the window's mean

    @staticmethod
    def _block_diagonal(block: nn.Sequential, g: int) -> nn.Sequential:
        """A body conv_bn_relu_2d block (BN folded) for G frames packed frame-major in the channels: one conv with
        weights [G*O, G*C, k, k] holding the block's conv G times on the diagonal, zeros elsewhere."""
        conv = fuse_conv_bn_eval(block[0], block[1])
        weight = conv.weight.detach()                                        # [O, C, k, k]
        out, cin = weight.shape[:2]
        packed = nn.Conv2d(g * cin, g * out, conv.kernel_size, conv.stride, conv.padding, bias=True)
        packed.weight.data = torch.block_diag(*[weight.flatten(1)] * g).reshape(g * out, g * cin, *weight.shape[2:])
        packed.bias.data = conv.bias.detach().repeat(g)
        return nn.Sequential(packed, nn.ReLU())

    @staticmethod
    def _grouped(block: nn.Sequential, g: int) -> nn.Sequential:
        """A body conv_bn_relu_2d block (BN folded) for G frames packed frame-major in the channels, as one grouped
        conv (groups=G): the block's conv on each frame's channels, no zero blocks to multiply."""
        conv = fuse_conv_bn_eval(block[0], block[1])
        grouped = nn.Conv2d(g * conv.in_channels, g * conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                            groups=g, bias=True)
        grouped.weight.data = conv.weight.detach().repeat(g, 1, 1, 1)         # [G*O, C, k, k]: block j = frame j
        grouped.bias.data = conv.bias.detach().repeat(g)
        return nn.Sequential(grouped, nn.ReLU())

    @staticmethod
    def _weights_for_pixels(packed: torch.Tensor, frame_planes: int) -> torch.Tensor:
        """Stem weights [O', C'', k, k] on normalised planes -> the same conv on raw pixels (0..255).

        A normalised plane of channel c is x = a_c * u + b_c (u the pixel, a_c = 1 / (255 std_c), b_c = -mean_c /
        std_c): so W * x = (W a) * u + sum over the taps of W b. Scaling the weights is exact; the sum over the taps
        is not a bias, because the stem zero-pads x (a mid-grey pixel) and a tap that falls in the padding adds
        nothing. So it rides on one more input plane, constant PIXEL_MAX inside the frame and zero-padded like the
        others: weights (sum over planes of W b) / PIXEL_MAX on it add exactly the in-frame taps' share at every
        output position, borders included."""
        mean, std = torch.tensor(KINETICS_MEAN), torch.tensor(KINETICS_STD)
        channel = torch.arange(frame_planes) % 3                             # frame planes are frame-major, RGB
        a, b = 1.0 / (255.0 * std[channel]), -mean[channel] / std[channel]
        pixels = packed.clone()
        pixels[:, :frame_planes] = packed[:, :frame_planes] * a[None, :, None, None]
        pixels[:, frame_planes] = (packed[:, :frame_planes] * b[None, :, None, None]).sum(1) / PIXEL_MAX
        return pixels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        planes = x.reshape(b, c * t, h, w)
        if self.pixel_input:   # uint8 pixels [B, 3, T, H, W] + the constant plane (one Pad); cast once gathered
            planes = nn.functional.pad(planes, (0, 0, 0, 0, 0, 1), value=PIXEL_MAX)
        groups = planes.index_select(1, self.planes)                        # [B, (T/G)*C'', H, W], one Gather
        groups = groups.reshape(b * t // self.frames_per_stem, self.per_conv, h, w)
        y = self.packed(self.stem_relu(self.stem(groups.float() if self.pixel_input else groups)))
        if self.frames_per_stem > 1 and len(self.body):   # y: [B*T/G, G*O, H', W'] -> [B*T, O, H', W'] (frame-major
            # blocks). Only then: a Reshape to the same shape stays in the graph and cuts onnxruntime's blocked-layout
            # chain (fp32: two reorders, 10% of the pruned demo student; int8: two Transposes)
            y = y.reshape(b * t, -1, y.shape[-2], y.shape[-1])
        features = self.flatten(self.pool(self.body(y)))   # [B*T, D], or [B*T/G, G*D] with the whole body packed
        return self.head(features.reshape(b, t, -1).transpose(1, 2))        # [B, D, T] -> logits


def build_model(spec: TeacherArch | StudentArch) -> nn.Module:
    if spec.kind == "teacher":
        from vidopt.teacher_net import ScaledVideoResNet  # torchvision (~1.3 s to import): only where a teacher is built

        return ScaledVideoResNet(spec)
    return Student(spec)


def arch_from_dict(raw: dict) -> TeacherArch | StudentArch:
    if raw.get("kind") == "teacher":
        return TeacherArch.model_validate(raw)
    # A student record written before `frame_differences` existed describes an RGB-only encoder: its weights have a
    # 3-channel stem, which the field's default (True) would not fit.
    return StudentArch.model_validate({"frame_differences": False, **raw})


def student_arch_of(model: Student, spec: StudentArch) -> StudentArch:
    """The record of a (possibly pruned) student: widths read back from its layers."""
    convs = [m for m in model.encoder.convs.modules() if isinstance(m, nn.Conv2d)]
    temporal = [m for m in model.head.convs.modules() if isinstance(m, nn.Conv1d)]
    return spec.model_copy(update={"conv_widths": [c.out_channels for c in convs],
                                   "temporal_widths": [c.out_channels for c in temporal]})
