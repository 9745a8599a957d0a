"""PaRaMS' released attention draws: the symmetric variant and the released non-symmetric draw.

The per-head matrix a release applied is read back from the release itself (A = Q'·Q⁺ per head,
on a float64 copy of a tiny BERT without MLP permutation), so each test checks the structure the
released code gives its matrices. Function preservation on every family is in test_defenses.py.
"""

from __future__ import annotations

import pytest
import torch
from test_defenses import setup

from mergesec.defenses import transforms as T
from mergesec.defenses.params import protect_params


def applied(scaling: str, part: str, seed: int = 0, **kw) -> torch.Tensor:
    """The per-head maps ``[heads, hd, hd]`` that ``scaling`` applied to ``part`` in layer 0."""
    _, base, expert, layout, _, _ = setup("bert")
    expert64 = {k: v.double() for k, v in expert.items()}
    release = protect_params(
        expert64, base, layout, scaling=scaling, permute_mlp=False, seed=seed, **kw
    )
    before, after = (T.read_layer(sd, layout, 0) for sd in (expert64, release))
    hd = layout.head_dim
    if part == "o":  # O' = O·B⁻¹ per head: B⁻¹ = O⁺·O'
        ob, oa = (T.split_cols(p.w["o"], hd) for p in (before, after))
        return torch.linalg.pinv(ob) @ oa
    wb, wa = (T.split_rows(p.w[part], hd) for p in (before, after))
    return wa @ torch.linalg.pinv(wb)


def test_symmetric_uses_one_symmetric_matrix_per_head_for_all_four_projections():
    a = applied("symmetric", "q")
    torch.testing.assert_close(a, a.transpose(-1, -2), rtol=0, atol=1e-8)
    eig = torch.linalg.eigvalsh(a)
    assert eig.min() >= 0.05 - 1e-8 and eig.max() <= 20.0 + 1e-8
    torch.testing.assert_close(applied("symmetric", "v"), a, rtol=0, atol=1e-8)
    torch.testing.assert_close(applied("symmetric", "k"), torch.linalg.inv(a), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(applied("symmetric", "o"), torch.linalg.inv(a), rtol=1e-6, atol=1e-8)


def test_released_nonsymmetric_reuses_the_qk_matrix_for_v_and_o():
    a = applied("nonsymmetric_released", "q")
    assert (a - a.transpose(-1, -2)).abs().max() > 1e-3
    torch.testing.assert_close(applied("nonsymmetric_released", "v"), a, rtol=1e-6, atol=1e-8)
    inv_t = torch.linalg.inv(a).transpose(-1, -2)
    torch.testing.assert_close(applied("nonsymmetric_released", "k"), inv_t, rtol=1e-6, atol=1e-8)
    # mergesec's nonsymmetric draws an independent matrix for V/O
    assert (applied("nonsymmetric", "v") - applied("nonsymmetric", "q")).abs().max() > 1e-3


def test_released_nonsymmetric_keeps_every_draw():
    """No conditioning filter: ``max_condition`` changes nothing, and the draws are those of
    mergesec's nonsymmetric Q/K matrix with the filter off."""
    a = applied("nonsymmetric_released", "q", max_condition=4.0)
    torch.testing.assert_close(applied("nonsymmetric_released", "q", max_condition=None), a)
    torch.testing.assert_close(applied("nonsymmetric", "q", max_condition=None), a)


@pytest.mark.parametrize("scaling", ["symmetric", "nonsymmetric_released"])
def test_new_variants_are_seeded(scaling):
    a, b = applied(scaling, "q", seed=3), applied(scaling, "q", seed=3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (applied(scaling, "q", seed=4) - a).abs().max() > 1e-3
