import pytest
import torch

from vidopt.models import Student, StudentArch, TeacherArch, arch_from_dict, build_model, with_frame_differences

ARCH = StudentArch(frames=4, height=16, width=16, conv_widths=[8, 8], conv_strides=[2, 2], temporal_widths=[8],
                   num_classes=3)


def test_frame_differences_are_next_minus_this_frame_and_zero_at_the_end():
    x = torch.arange(2 * 3 * 4 * 2 * 2, dtype=torch.float32).reshape(2, 3, 4, 2, 2) ** 2  # [B, C, T, H, W]
    out = with_frame_differences(x)
    assert out.shape == (2, 6, 4, 2, 2)
    assert torch.equal(out[:, :3], x)
    assert torch.equal(out[:, 3:, :3], x[:, :, 1:] - x[:, :, :-1])
    assert torch.count_nonzero(out[:, 3:, 3]) == 0


def test_a_still_clip_has_zero_difference_channels_and_the_encoder_reads_six_channels():
    still = torch.rand(1, 3, 1, 16, 16).expand(1, 3, 4, 16, 16)
    model = Student(ARCH)
    assert model.encoder.convs[0][0].in_channels == 6 == ARCH.input_channels()
    assert torch.count_nonzero(model.encoder_input(still)[:, 3:]) == 0


def test_without_frame_differences_the_encoder_reads_the_rgb_frames():
    arch = ARCH.model_copy(update={"frame_differences": False})
    model = Student(arch).eval()
    x = torch.rand(2, 3, 4, 16, 16)
    assert model.encoder.convs[0][0].in_channels == 3 == arch.input_channels()
    assert torch.equal(model.encoder_input(x), x)
    assert model(x).shape == (2, 3)



def test_teacher_frame_differences_are_opt_in_and_widen_only_the_stem():
    plain = build_model(TeacherArch(arch="r3d_18", width=0.125, num_classes=3))
    with_diff = build_model(TeacherArch(arch="r3d_18", width=0.125, frame_differences=True, num_classes=3))
    assert plain.stem[0].in_channels == 3 and with_diff.stem[0].in_channels == 6
    assert {k: v.shape for k, v in plain.state_dict().items() if not k.startswith("stem.0.")} == \
           {k: v.shape for k, v in with_diff.state_dict().items() if not k.startswith("stem.0.")}
    assert with_diff.eval()(torch.rand(2, 3, 4, 32, 32)).shape == (2, 3)


def test_a_student_record_from_before_frame_differences_rebuilds_its_rgb_encoder():
    old_record = ARCH.model_dump()
    del old_record["frame_differences"]
    rebuilt = arch_from_dict(old_record)
    assert rebuilt.frame_differences is False and build_model(rebuilt).encoder.convs[0][0].in_channels == 3
    assert arch_from_dict(ARCH.model_dump()) == ARCH  # records that name the field keep it


def test_a_patchify_stem_cuts_non_overlapping_patches_and_the_pooling_fits_its_map():
    arch = ARCH.model_copy(update={"conv_strides": [4, 2], "stem_kernel": 4})
    arch = StudentArch.model_validate(arch.model_dump())
    model = Student(arch).eval()
    stem = model.encoder.convs[0][0]
    assert (stem.kernel_size, stem.stride, stem.padding) == ((4, 4), (4, 4), (0, 0))
    assert arch.final_map() == (2, 2)  # 16 -> 4 patches -> 2 (3x3, stride 2, padded)
    frames = torch.rand(3, 6, 16, 16)
    assert model.encoder.convs(frames).shape[-2:] == arch.final_map()
    assert model(torch.rand(2, 3, 4, 16, 16)).shape == (2, 3)


def test_a_stem_kernel_neither_odd_nor_its_stride_is_refused_by_name():
    with pytest.raises(ValueError, match="stem_kernel=4"):
        StudentArch.model_validate({**ARCH.model_dump(), "stem_kernel": 4})  # stride 2: patches would overlap
