"""`python -m fastssl.expand`: expansion from MAE and timm checkpoints, export, one-line errors."""
import subprocess
import sys

import pytest
import torch

from fastssl.expand import main
from fastssl.models import build_mae, build_vit_encoder, load_encoder, scalenet


@pytest.fixture(scope="module")
def mae_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("expand") / "mae.pth"
    torch.manual_seed(0)
    torch.save({"model": build_mae("micro", patch_size=8, img_size=32).state_dict()}, path)
    return path


def test_expand_then_export_roundtrip(mae_ckpt, tmp_path, capsys):
    out = tmp_path / "x2.pth"
    main([str(mae_ckpt), "--depth", "8", "--map", "interleave", "--adapter-rank", "4", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "before" in printed and "overhead" in printed and "8 positions run 4 shared blocks" in printed
    sd = torch.load(out, weights_only=True)["model"]
    assert sd["scalenet"]["sources"] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert "blocks.1.attn.qkv.weight" not in sd  # position 1 shares block 0's tensors, saved once

    plain = tmp_path / "vit.pth"
    main([str(out), "--export", "--out", str(plain)])
    vit = build_vit_encoder("micro", patch_size=8, img_size=32, depth=8)
    load_encoder(vit, torch.load(plain, weights_only=True)["model"])


def test_expand_a_timm_encoder(tmp_path):
    torch.manual_seed(0)
    src = tmp_path / "vit.pth"
    torch.save(build_vit_encoder("micro", patch_size=8, img_size=32).state_dict(), src)
    out = tmp_path / "vit_x2.pth"
    main([str(src), "--depth", "6", "--adapter-where", "attn", "--out", str(out)])
    sd = torch.load(out, weights_only=True)["model"]
    assert sd["scalenet"]["where"] == "attn" and "blocks.5.attn.proj.adapter.up.weight" in sd


@pytest.mark.parametrize("args,message", [
    (["--depth", "4"], "depth=4: must be greater than the encoder's 4 layers"),
    (["--depth", "8", "--adapter-rank", "0"], "adapter rank=0: must be in 1..63"),
    (["--depth", "8", "--adapter-rank", "64"], "adapter rank=64"),
    (["--depth", "8", "--map", "zigzag"], "unknown map 'zigzag'; choose one of cyclic, interleave"),
    (["--depth", "8", "--adapter-where", "ffn"], "adapter where='ffn'"),
])
def test_bad_input_one_line_error_nothing_written(mae_ckpt, tmp_path, capsys, args, message):
    out = tmp_path / "bad.pth"
    with pytest.raises(SystemExit) as e:
        main([str(mae_ckpt), *args, "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err
    assert list(tmp_path.iterdir()) == []


def test_bad_input_from_the_command_line_exits_2_without_traceback(mae_ckpt, tmp_path):
    out = tmp_path / "bad.pth"
    r = subprocess.run([sys.executable, "-m", "fastssl.expand", str(mae_ckpt), "--depth", "2", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: depth=2") and "Traceback" not in r.stderr
    assert not out.exists()


def test_missing_or_already_expanded_input_is_refused(mae_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nope.pth"), "--depth", "8", "--out", str(tmp_path / "o.pth")])
    assert "no such file" in capsys.readouterr().err
    x2 = tmp_path / "x2.pth"
    main([str(mae_ckpt), "--depth", "8", "--out", str(x2)])
    with pytest.raises(SystemExit):
        main([str(x2), "--depth", "16", "--out", str(tmp_path / "x4.pth")])
    assert "already ScaleNet-expanded" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(mae_ckpt), "--export", "--out", str(tmp_path / "e.pth")])
    assert "not ScaleNet-expanded" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x2.pth"]


def test_expand_an_mae_of_non_default_depth(tmp_path):
    src = tmp_path / "mae6.pth"
    torch.save({"model": build_mae("micro", patch_size=8, img_size=32, depth=6).state_dict()}, src)
    main([str(src), "--depth", "9", "--map", "interleave", "--out", str(tmp_path / "x.pth")])
    assert torch.load(tmp_path / "x.pth", weights_only=True)["model"]["scalenet"]["sources"] == \
        [0, 0, 1, 2, 2, 3, 4, 4, 5]


def test_a_checkpoint_saved_before_its_last_growth_expands_only_its_trained_blocks(tmp_path, capsys):
    """A progressive checkpoint holds every block, but only its `layer_plan` ever ran: expansion
    shares those, as `init=` reads them, and never the untrained ones."""
    torch.manual_seed(0)
    mae = build_mae("micro", patch_size=8, img_size=32)  # 4 blocks, of which the plan runs 2
    src = tmp_path / "ckpt_before_growth.pt"
    torch.save({"model": mae.state_dict(), "progress": {"step": 10},
                "config": {"progressive": {"growth": {"gate_steps": 4}}},
                "progressive": {"layer_plan": [0, 2], "gate_start": {}}}, src)
    main([str(src), "--depth", "4", "--out", str(tmp_path / "x.pth")])
    assert "4 positions run 2 shared blocks" in capsys.readouterr().out
    sd = torch.load(tmp_path / "x.pth", weights_only=True)["model"]
    assert sd["scalenet"]["sources"] == [0, 1, 0, 1]
    trained = mae.state_dict()
    assert torch.equal(sd["blocks.0.attn.qkv.weight"], trained["blocks.0.attn.qkv.weight"])
    assert torch.equal(sd["blocks.1.attn.qkv.weight"], trained["blocks.2.attn.qkv.weight"])
