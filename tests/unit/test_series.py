"""Stored series to volumes (storage/images/series.py): stacks sorted along the slice normal,
rescale applied, echoes and localizers kept apart."""

from __future__ import annotations

import numpy as np

from denoised_node.storage.images.series import load_volume, plan_stacks


def _real(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    return stored.astype(np.float64) * slope + intercept


def test_stack_is_sorted_along_the_normal(mr_series_factory) -> None:  # type: ignore[no-untyped-def]
    series = mr_series_factory(slices=9, shuffle=True, orientation="oblique")
    plan = plan_stacks(series.paths)
    assert len(plan.stacks) == 1 and not plan.skipped
    positions = [ref.position for ref in plan.stacks[0].slices]
    assert positions == sorted(positions)
    assert len(set(np.round(np.diff(positions), 3))) == 1


def test_volume_applies_rescale(mr_series_factory) -> None:  # type: ignore[no-untyped-def]
    series = mr_series_factory(slices=4, rescale_slope=2.5, rescale_intercept=-100.0)
    stack = plan_stacks(series.paths).stacks[0]
    volume = load_volume(stack)
    by_uid = series.pixels_by_uid
    for index, ref in enumerate(stack.slices):
        np.testing.assert_allclose(volume[index], _real(by_uid[ref.sop_instance_uid], 2.5, -100),
                                   rtol=1e-6)


def test_echoes_and_localizers_are_separated(mr_series_factory) -> None:  # type: ignore[no-untyped-def]
    series = mr_series_factory(slices=5, echoes=2, localizers=2)
    plan = plan_stacks(series.paths)
    assert sorted(stack.depth for stack in plan.stacks) == [5, 5]
    assert [reason for _, reason in plan.skipped] == ["localizer", "localizer"]
    assert {stack.label for stack in plan.stacks} == {"64x56, echo 1", "64x56, echo 2"}
