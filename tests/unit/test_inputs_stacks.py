"""Series that hold several stacks: each is found, sorted and loaded on its own (echoes,
positions repeated over time with or without temporal tags, b-values, matrices, spacings)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from denoised_node.storage.images.series import Stack, load_volume, plan_stacks
from tests.fixtures.identity import StudyInfo
from tests.fixtures.mr_series import GeneratedSeries
from tests.fixtures.other_objects import write_legacy_converted

Factory = Callable[..., GeneratedSeries]


def _uids(stack: Stack) -> list[str]:
    return [ref.sop_instance_uid for ref in stack.slices]


def _positions_ascend(stack: Stack) -> bool:
    positions = [ref.position for ref in stack.slices]
    return positions == sorted(positions) and len(set(positions)) == len(positions)


def test_echoes_are_stacks_and_localizers_are_skipped(mr_series_factory: Factory) -> None:
    series = mr_series_factory(slices=4, echoes=3, localizers=3, shuffle=True)
    plan = plan_stacks(series.paths)
    assert [stack.label for stack in plan.stacks] == [f"64x56, echo {e}" for e in (1, 2, 3)]
    for echo, stack in enumerate(plan.stacks, start=1):
        assert _uids(stack) == [i.sop_instance_uid for i in series.stack(echo)]
        np.testing.assert_array_equal(load_volume(stack), series.volume(echo))
    assert sorted(reason for _, reason in plan.skipped) == ["localizer"] * 3


@pytest.mark.parametrize("tags", [True, False], ids=["temporal-tags", "instance-numbers-only"])
def test_positions_repeated_over_time_are_separate_stacks(mr_series_factory: Factory,
                                                          tags: bool) -> None:
    series = mr_series_factory(slices=4, temporal_positions=3, temporal_tags=tags, shuffle=True)
    plan = plan_stacks(series.paths)
    assert len(plan.stacks) == 3 and plan.slice_count == 12
    for time, stack in enumerate(plan.stacks, start=1):
        assert _uids(stack) == [i.sop_instance_uid for i in series.stack(temporal=time)]
        assert _positions_ascend(stack)
        np.testing.assert_array_equal(load_volume(stack), series.volume(temporal=time))


def test_enhanced_frames_split_by_echo_and_time(mr_series_factory: Factory) -> None:
    series = mr_series_factory(slices=3, echoes=2, temporal_positions=2, enhanced=True,
                               orientation="oblique")
    plan = plan_stacks(series.paths)
    assert len(plan.stacks) == 4 and {stack.depth for stack in plan.stacks} == {3}
    for stack in plan.stacks:
        assert _positions_ascend(stack)
        echo = 1 if "TE 12" in stack.label else 2
        time = int(stack.label.rsplit("time ", 1)[1])
        np.testing.assert_array_equal(load_volume(stack), series.volume(echo, temporal=time))


def test_legacy_converted_echoes_come_from_the_unassigned_groups(
        mr_series_factory: Factory, tmp_path: Path) -> None:
    classic = mr_series_factory(slices=3, echoes=2)
    plan = plan_stacks([write_legacy_converted(tmp_path / "legacy", classic.paths)])
    assert [stack.label for stack in plan.stacks] == ["64x56, echo 1", "64x56, echo 2"]
    for echo, stack in enumerate(plan.stacks, start=1):
        np.testing.assert_array_equal(load_volume(stack), classic.volume(echo))


def _same_series(mr_series_factory: Factory, base: GeneratedSeries, seed: int,
                 extra: dict[str, object] | None = None, **overrides: object) -> GeneratedSeries:
    """More images for base's series (another seed gives other SOP Instance UIDs)."""
    extra = {"SeriesInstanceUID": base.series_uid, **(extra or {})}
    return mr_series_factory(seed=seed, study=base.spec.effective_study, extra=extra,
                             **overrides)


def test_matrices_spacings_and_b_values_are_separate_stacks(mr_series_factory: Factory) -> None:
    base = mr_series_factory(slices=3, study=StudyInfo(seed=3), rows=64, columns=64)
    other_matrix = _same_series(mr_series_factory, base, 11, slices=2, rows=80, columns=64)
    other_spacing = _same_series(mr_series_factory, base, 12, slices=2, rows=64, columns=64,
                                 pixel_spacing=(2.0, 2.0))
    diffusion = _same_series(mr_series_factory, base, 13, slices=3, rows=64, columns=64,
                             extra={"DiffusionBValue": 1000})
    paths = base.paths + other_matrix.paths + other_spacing.paths + diffusion.paths
    plan = plan_stacks(paths)
    assert sorted(stack.depth for stack in plan.stacks) == [2, 2, 3, 3]
    labels = sorted(stack.label for stack in plan.stacks)
    assert "64x64, echo 1, b 1000" in labels and "80x64, echo 1" in labels
    for stack in plan.stacks:
        assert _positions_ascend(stack)


def test_single_slice_is_a_stack_of_one(mr_series_factory: Factory) -> None:
    series = mr_series_factory(slices=1, rows=32, columns=30)
    (stack,) = plan_stacks(series.paths).stacks
    assert load_volume(stack).shape == (1, 32, 30)


def test_stacks_know_their_voxel_spacing(mr_series_factory: Factory) -> None:
    series = mr_series_factory(slices=5, rows=40, columns=36, pixel_spacing=(0.8, 0.9),
                               slice_thickness=1.0, slice_spacing=1.2, shuffle=True)
    (stack,) = plan_stacks(series.paths).stacks
    assert stack.voxel_spacing == pytest.approx((1.2, 0.8, 0.9))
    single = mr_series_factory(slices=1, rows=32, columns=30)
    (one,) = plan_stacks(single.paths).stacks
    assert one.voxel_spacing is None  # no neighbour to measure the slice spacing from
