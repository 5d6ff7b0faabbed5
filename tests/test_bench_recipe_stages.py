"""The per-stage GPU benchmark runs its CPU path: one row per recipe stage, at the stage's depth and split."""
from benchmarks import recipe_stages


def test_one_row_per_stage_at_its_depth_and_split():
    rows = recipe_stages.main(["--recipes", "recipes/demo/pretrain_cpu_fast.yaml", "--world", "2", "--batch-cap", "1",
                               "--steps", "1", "--runs", "1", "--device", "cpu"])
    # 128 images a step over 2 processes: 64 each, capped at 1 image a micro-batch for the CPU
    assert [(r["res"], r["depth"], r["micro_batch"], r["accum_steps"]) for r in rows] == [
        (32, 1, 1, 1), (48, 1, 1, 1), (64, 4, 1, 1)]
    assert all(r["variants"]["async"]["median"] > 0 and r["peak_mem_gib"] is None for r in rows)


def test_a_family_recipe_is_benched_member_by_member_at_each_size():
    rows = recipe_stages.main(["--recipes", "recipes/demo/pretrain_cpu_family.yaml", "--world", "2", "--batch-cap",
                               "1", "--steps", "1", "--runs", "1", "--device", "cpu"])
    assert [r["recipe"].rsplit(" ", 1)[-1] for r in rows] == ["[micro]", "[mini]", "[midi]"]
    assert [r["depth"] for r in rows] == [4, 4, 8]  # each member at its own size's depth
