"""smart_proxy/placement.py: where a model goes among declared GPUs, case by case (no GPU needed)."""

from __future__ import annotations

import pytest

from smart_proxy.errors import ModelTooLarge
from smart_proxy.placement import Gpu, Placement, parse_inventory, parse_nvidia_smi, place, sets_gpu_flags

GIB = 1024**3


def test_one_model_per_gpu_best_fit() -> None:
    free = {0: 24 * GIB, 1: 12 * GIB}
    small = place("small", 8 * GIB, 32, free)
    assert small == Placement((1,), (8 * GIB,))  # the smaller GPU that fits: the large one stays free
    big = place("big", 20 * GIB, 40, {0: 24 * GIB, 1: 4 * GIB})  # GPU 1 now holds "small"
    assert big.gpus == (0,) and not big.partial
    assert big.env() == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "0"}
    assert big.args() == ("--device", "CUDA0", "--split-mode", "none", "--n-gpu-layers", "all", "--fit", "off")
    assert (big.vram, big.on(0), big.on(1), big.describe()) == (20 * GIB, 20 * GIB, 0, "GPU 0")
    assert place("tie", GIB, 8, {3: 2 * GIB, 1: 2 * GIB}).gpus == (1,)  # lowest index on a tie


def test_a_split_across_the_fewest_gpus_in_proportion_to_their_free_memory() -> None:
    free = {0: 16 * GIB, 1: 24 * GIB, 2: 8 * GIB}
    split = place("70b", 36 * GIB, 80, free)
    assert split.gpus == (1, 0)  # largest first, two are enough
    assert sum(split.shares) <= 36 * GIB and all(s <= free[g] for g, s in zip(split.gpus, split.shares, strict=True))
    assert split.shares == (36 * GIB * 24 // 40, 36 * GIB * 16 // 40)
    assert split.env()["CUDA_VISIBLE_DEVICES"] == "1,0"
    assert split.args() == (
        "--device", "CUDA0,CUDA1", "--split-mode", "layer", "--tensor-split", "22118,14745", "--n-gpu-layers", "all",
        "--fit", "off",
    )  # fmt: skip
    assert split.describe() == "GPUs 1,0 (split)"


def test_a_partial_offload_when_it_fits_nowhere_whole_and_the_model_allows_it() -> None:
    free = {0: 10 * GIB}
    partial = place("huge", 40 * GIB, 80, free, allow_partial=True)
    assert partial.partial and partial.gpus == (0,)
    assert partial.gpu_layers == 20  # 0.5 GiB per layer, 10 GiB free
    assert partial.args()[-4:] == ("--n-gpu-layers", "20", "--fit", "off")
    assert partial.describe() == "GPU 0, 20 layers (partial)" and partial.vram == 20 * GIB // 2
    across = place("huge", 40 * GIB, 80, {0: 10 * GIB, 1: 6 * GIB}, allow_partial=True)
    assert across.gpu_layers == 32 and across.gpus == (0, 1) and "--tensor-split" in across.args()


def test_a_refusal_names_the_need_and_what_is_free() -> None:
    with pytest.raises(ModelTooLarge, match=r"needs 40\.0 GiB .* \(free: GPU 0: 10\.0 GiB\); allow_partial = true \(\[pool\]"):
        place("huge", 40 * GIB, 80, {0: 10 * GIB})
    with pytest.raises(ModelTooLarge, match="free: no GPU"):
        place("any", GIB, 8, {}, allow_partial=True)
    with pytest.raises(ModelTooLarge, match="not even one layer fits"):
        place("huge", 40 * GIB, 4, {0: GIB}, allow_partial=True)
    with pytest.raises(ModelTooLarge, match=r"needs its layer count \(\[model:huge\] layers\)"):
        place("huge", 40 * GIB, 0, {0: 10 * GIB}, allow_partial=True)
    assert ModelTooLarge("x").status == 507


def test_no_gpu_placement_offloads_nothing() -> None:
    assert Placement().env()["CUDA_VISIBLE_DEVICES"] == ""
    assert Placement().args() == ("--device", "none", "--n-gpu-layers", "0")


def test_parse_inventory() -> None:
    assert parse_inventory("0:24GiB, 1:24GiB") == (Gpu(0, 24 * GIB), Gpu(1, 24 * GIB))
    assert parse_inventory("2:512MB") == (Gpu(2, 512 * 1024**2),)
    for bad in ("0", "a:1g", "0:big", "0:1g,0:2g", "-1:1g", "0:0", ""):
        with pytest.raises(ValueError):
            parse_inventory(bad)


def test_a_model_that_sets_its_own_gpu_flags_is_not_placed() -> None:
    assert sets_gpu_flags(["-c", "4096", "-ngl", "20"]) and sets_gpu_flags(["--device=none"])
    assert sets_gpu_flags(["--tensor-split", "1,1"]) and sets_gpu_flags(["--fit", "on"])
    assert not sets_gpu_flags(["-c", "4096", "--n-gpu-layers-draft", "8", "-np", "2"])


def test_parse_nvidia_smi() -> None:
    text = "0, 24576, 310\n1, 24576, 24000\n2, [N/A], [N/A]\n"
    assert parse_nvidia_smi(text) == (Gpu(0, (24576 - 310) * 1024**2), Gpu(1, 576 * 1024**2))
    assert parse_nvidia_smi("") == ()
