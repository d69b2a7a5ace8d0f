"""Release-layout checkpoints: save_released / load_released round trips and strictness.

Offline and CPU-only. Tiny registry models (random weights) exercise the format and the error
paths; the slow test writes a random checkpoint with exactly the released model's tensor
names, shapes and dtypes (the manifest) for both connectors and loads each strictly.
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from unigeoseg_backend.errors import WeightsError
from unigeoseg_backend.model.checkpoint import (
    LoadedModel,
    clear_cache,
    load_released,
    save_released,
)
from unigeoseg_backend.model.conversion import fuse_qkv, model_to_released, split_fused_qkv
from unigeoseg_backend.model.manifest import load_manifest, manifest_tensors
from unigeoseg_backend.model.prompting import (
    PAD_TOKEN,
    add_special_tokens,
    build_prompt,
    seg_token_id,
)
from unigeoseg_backend.model.registry import get_config, official_config
from unigeoseg_backend.model.release_config import read_release_config
from unigeoseg_backend.model.swin import relative_position_index
from unigeoseg_backend.model.unigeoseg import UniGeoSeg

TINY_SPARSE = "unigeoseg-tiny-sparseconv"
TINY_MSCC = "unigeoseg-tiny-mscc"
INDEX = "model.safetensors.index.json"
WORDS = ("[INST] [/INST] <<SYS>> <</SYS>> This is an image , Please doing Reasoning "
         "Referring Segmentation according to the following instruction : the red roof of "
         "building road river Sure It . You are a helpful language and vision assistant").split()


def make_tokenizer(with_seg: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (a few dozen tokens), with [PAD]/[SEG] added like SegEarth-R1."""
    vocab = {"<|endoftext|>": 0, "[UNK]": 1}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]",
                                        bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    if with_seg:
        add_special_tokens(tokenizer)
    return tokenizer


def random_model(name: str, seed: int = 0) -> UniGeoSeg:
    """A registry model with every parameter random (no zero biases that would compare equal
    by accident)."""
    torch.manual_seed(seed)
    model = UniGeoSeg(get_config(name)).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.05)
    return model


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), name
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())  # incl. non-persistent (rotary)
    assert list(ba) == list(bb)
    for name in ba:
        assert torch.equal(ba[name], bb[name]), name


def assert_parameters_are_the_saved_tensors(model: torch.nn.Module) -> None:
    """Each parameter has one name, and parameters plus persistent buffers are the state
    dict: what an optimizer or DDP sees is what is saved."""
    named = list(model.named_parameters(remove_duplicate=False))
    assert len({id(p) for _, p in named}) == len(named)
    buffers = {n for n, _ in model.named_buffers()}
    assert {n for n, _ in named} == set(model.state_dict()) - buffers


def shard_of(folder: Path, name: str) -> Path:
    index = json.loads((folder / INDEX).read_text())
    return folder / index["weight_map"][name]


def edit_checkpoint(folder: Path, remove: str | None = None,
                    replace: tuple[str, torch.Tensor] | None = None,
                    add: tuple[str, torch.Tensor] | None = None) -> None:
    """Rewrite the shard(s) and index of a saved folder."""
    index_file = folder / INDEX
    index = json.loads(index_file.read_text())
    for name, tensor in [(remove, None)] if remove else [replace or add]:
        file = folder / index["weight_map"].get(name, sorted(set(index["weight_map"].values()))[0])
        tensors = load_file(file)
        if tensor is None:
            del tensors[name]
            del index["weight_map"][name]
        else:
            tensors[name] = tensor.contiguous()
            index["weight_map"][name] = file.name
        save_file(tensors, str(file), metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))


# ====================================================================== tiny round trips


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, tokenizer) -> tuple[UniGeoSeg, Path]:
    model = random_model(TINY_SPARSE)
    folder = tmp_path_factory.mktemp("tiny") / "release"
    save_released(model, tokenizer, folder, max_shard_bytes=256 << 10)
    return model, folder


def test_tokenizer_fits_tiny_vocab(tokenizer):
    assert len(tokenizer) <= get_config(TINY_SPARSE).language["vocab_size"]
    assert tokenizer.pad_token == PAD_TOKEN and seg_token_id(tokenizer) == len(tokenizer) - 1


def test_saved_layout_is_the_released_one(saved_tiny):
    model, folder = saved_tiny
    config = json.loads((folder / "config.json").read_text())
    assert config["mm_projector_type"] == "SparseConv_1"
    assert config["unigeoseg_arch"] == TINY_SPARSE
    assert config["model_type"] == "llava_phi" and config["architectures"] == ["UniGeoSeg"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "partial_rotary_factor", "rope_theta"):
        assert config[key] == model.config.language[key], key
    assert config["tie_word_embeddings"] is False

    index = json.loads((folder / INDEX).read_text())
    names = set(index["weight_map"])
    assert "model.layers.0.self_attn.query_key_value.weight" in names
    assert "model.layers.1.self_attn.query_key_value.bias" in names
    assert not any(".q_proj." in n or ".k_proj." in n or ".v_proj." in n for n in names)
    assert names == set(model_to_released(model.state_dict(), 4))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all(s.endswith(f"-of-{len(shards):05d}.safetensors")
                                    for s in shards)
    connector = {s for n, s in index["weight_map"].items() if n.startswith("model.mm_projector.")}
    assert len(connector) == 1
    assert all(n.startswith("model.mm_projector.") for n, s in index["weight_map"].items()
               if s in connector)
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in load_all(folder).values())
    assert (folder / "tokenizer.json").is_file()
    assert not list(folder.parent.glob(".release.*"))  # no temporary folder left behind

    # fused rows interleaved per head: h0:q, h0:k, h0:v, h1:q, ...
    attn = model.model.layers[1].self_attn
    fused = load_file(shard_of(folder, "model.layers.1.self_attn.query_key_value.weight"))[
        "model.layers.1.self_attn.query_key_value.weight"]
    hd = 16
    for h in range(4):
        rows = slice(h * hd, (h + 1) * hd)
        assert torch.equal(fused[3 * h * hd:3 * h * hd + hd], attn.q_proj.weight[rows])
        assert torch.equal(fused[3 * h * hd + hd:3 * h * hd + 2 * hd], attn.k_proj.weight[rows])
        assert torch.equal(fused[3 * h * hd + 2 * hd:3 * (h + 1) * hd], attn.v_proj.weight[rows])


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def test_fuse_qkv_inverts_split():
    w, b = torch.randn(3 * 32, 8), torch.randn(3 * 32)
    q_w, q_b, k_w, k_b, v_w, v_b = split_fused_qkv(w, b, num_heads=4)
    assert torch.equal(fuse_qkv(q_w, k_w, v_w, 4), w)
    assert torch.equal(fuse_qkv(q_b, k_b, v_b, 4), b)


@pytest.mark.parametrize("name", [TINY_SPARSE, TINY_MSCC])
def test_tiny_round_trip_is_exact(name, tmp_path, tokenizer):
    model = random_model(name, seed=1)
    folder = save_released(model, tokenizer, tmp_path / "ckpt", max_shard_bytes=512 << 10)
    loaded = load_released(folder)
    assert isinstance(loaded, LoadedModel)
    assert loaded.name == name and loaded.path == folder.resolve()
    assert loaded.config == model.config
    assert not loaded.model.training
    assert_same_model(model, loaded.model)
    assert_parameters_are_the_saved_tensors(loaded.model)
    assert seg_token_id(loaded.tokenizer) == seg_token_id(tokenizer)

    # same predictions end to end (image side, Phi, heads, mask decoder)
    torch.manual_seed(2)
    size = model.config.image_size
    images = torch.randn(1, 3, size, size)
    prompt = build_prompt("referring", "the red roof", loaded.tokenizer)
    with torch.no_grad():
        expected = model.segment(model.encode_images(images), [prompt])
        got = loaded.model.segment(loaded.model.encode_images(images), [prompt])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_cache_returns_the_same_object(saved_tiny, tmp_path, tokenizer):
    _, folder = saved_tiny
    first = load_released(folder)
    assert load_released(str(folder), device="cpu", dtype=torch.float32) is first
    other = load_released(folder, dtype=torch.bfloat16)
    assert other is not first and other.model.lm_head.weight.dtype == torch.bfloat16
    assert other.model.model.vision_tower.layers[0].blocks[0].attn.relative_position_index.dtype \
        == torch.int64
    # saving into a folder evicts what was cached from it
    copy = save_released(first, None, tmp_path / "copy")
    a = load_released(copy)
    save_released(first, tokenizer, copy)
    b = load_released(copy)
    assert a is not b
    assert_same_model(a.model, b.model)
    clear_cache(copy)
    assert load_released(copy) is not b


def test_saving_a_loaded_model_keeps_extra_config_fields(saved_tiny, tmp_path):
    _, folder = saved_tiny
    work = tmp_path / "work"
    shutil.copytree(folder, work)
    config = json.loads((work / "config.json").read_text())
    config["note"] = "kept"
    (work / "config.json").write_text(json.dumps(config))
    loaded = load_released(work)
    again = save_released(loaded, None, tmp_path / "again", connector_shard=False,
                          max_shard_bytes=1 << 30)
    assert (again / "model.safetensors").is_file() and not (again / INDEX).exists()
    assert json.loads((again / "config.json").read_text())["note"] == "kept"
    assert_same_model(loaded.model, load_released(again).model)


def test_split_qkv_names_load_too(saved_tiny, tmp_path):
    """transformers >= 4.37 exports (q_proj/k_proj/v_proj) are accepted as well."""
    model, folder = saved_tiny
    work = tmp_path / "split"
    shutil.copytree(folder, work)
    for file in work.glob("*.safetensors"):
        file.unlink()
    (work / INDEX).unlink()
    split = model_to_released(model.state_dict(), 4, fused_qkv=False)
    assert "model.layers.0.self_attn.q_proj.weight" in split and "ref_attn.query" in split
    save_file({k: v.contiguous() for k, v in split.items()}, str(work / "model.safetensors"))
    assert_same_model(model, load_released(work).model)


@pytest.mark.parametrize("sharded", [False, True])
def test_bin_checkpoints_load(saved_tiny, tmp_path, sharded):
    model, folder = saved_tiny
    work = tmp_path / "bin"
    shutil.copytree(folder, work)
    state = load_all(work)
    for file in work.glob("*.safetensors"):
        file.unlink()
    (work / INDEX).unlink()
    if sharded:
        names = sorted(state)
        halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
                  "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
        for file, part in halves.items():
            torch.save({n: state[n] for n in part}, work / file)
        weight_map = {n: f for f, part in halves.items() for n in part}
        (work / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        torch.save(state, work / "pytorch_model.bin")
    assert_same_model(model, load_released(work).model)


class NotATensor:
    pass


def test_bin_with_code_is_refused(saved_tiny, tmp_path):
    _, folder = saved_tiny
    work = tmp_path / "evil"
    shutil.copytree(folder, work, ignore=shutil.ignore_patterns("*.safetensors", INDEX))
    torch.save({"lm_head.weight": NotATensor()}, work / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="weights only"):
        load_released(work)


# ====================================================================== strictness


@pytest.fixture()
def work_copy(saved_tiny, tmp_path) -> Path:
    _, folder = saved_tiny
    work = tmp_path / "work"
    shutil.copytree(folder, work)
    return work


def test_missing_tensor_is_named(work_copy):
    name = "model.layers.1.self_attn.query_key_value.bias"
    edit_checkpoint(work_copy, remove=name)
    with pytest.raises(WeightsError, match=r"1 missing \(model\.layers\.1\.self_attn"
                                           r"\.query_key_value\.bias\)") as info:
        load_released(work_copy)
    assert info.value.details["missing_keys"] == [name]
    assert info.value.details["unexpected_keys"] == []


def test_misshaped_tensor_is_named(work_copy):
    name = "model.vision_tower.layers.1.blocks.0.mlp.fc1.weight"
    tensor = load_file(shard_of(work_copy, name))[name]
    edit_checkpoint(work_copy, replace=(name, tensor.t()))
    with pytest.raises(WeightsError, match="1 with the wrong shape") as info:
        load_released(work_copy)
    assert name in str(info.value)
    assert info.value.details["mismatched_shapes"] == {
        name: {"checkpoint": list(tensor.t().shape), "expected": list(tensor.shape)}}


def test_extra_tensor_is_named(work_copy):
    edit_checkpoint(work_copy, add=("model.layers.1.self_attn.extra.weight", torch.zeros(3)))
    with pytest.raises(WeightsError, match=r"1 unexpected \(model\.layers\.1\.self_attn\.extra"
                                           r"\.weight\)") as info:
        load_released(work_copy)
    assert info.value.details["unexpected_keys"] == ["model.layers.1.self_attn.extra.weight"]


def test_wrong_dtype_is_named(work_copy):
    name = "model.vision_tower.layers.0.blocks.0.attn.relative_position_index"
    tensor = load_file(shard_of(work_copy, name))[name]
    edit_checkpoint(work_copy, replace=(name, tensor.float()))
    with pytest.raises(WeightsError, match="wrong dtype") as info:
        load_released(work_copy)
    assert name in info.value.details["mismatched_dtypes"]


def test_index_naming_the_wrong_shard_is_refused(work_copy):
    index = json.loads((work_copy / INDEX).read_text())
    name = "lm_head.weight"
    others = sorted(set(index["weight_map"].values()) - {index["weight_map"][name]})
    index["weight_map"][name] = others[0]
    (work_copy / INDEX).write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="lm_head.weight"):
        load_released(work_copy)


def test_missing_config_json(work_copy):
    (work_copy / "config.json").unlink()
    with pytest.raises(WeightsError, match="config.json"):
        load_released(work_copy)


def test_no_weights(work_copy):
    for file in work_copy.glob("*.safetensors"):
        file.unlink()
    (work_copy / INDEX).unlink()
    with pytest.raises(WeightsError, match="no weights"):
        load_released(work_copy)


def test_missing_shard(work_copy):
    shard_of(work_copy, "lm_head.weight").unlink()
    with pytest.raises(WeightsError, match="not there"):
        load_released(work_copy)


def test_no_folder(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_released(tmp_path / "nothing")


def test_tokenizer_without_seg(work_copy):
    for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "added_tokens.json"):
        (work_copy / file).unlink(missing_ok=True)
    make_tokenizer(with_seg=False).save_pretrained(str(work_copy))
    with pytest.raises(WeightsError, match=r"\[SEG\]"):
        load_released(work_copy)


def test_no_tokenizer(work_copy):
    for file in work_copy.glob("*token*"):
        file.unlink()
    with pytest.raises(WeightsError, match="tokenizer"):
        load_released(work_copy)


def test_arch_and_connector_must_agree(work_copy):
    config = json.loads((work_copy / "config.json").read_text())
    config["mm_projector_type"] = "MSCC"
    (work_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="contradicts"):
        load_released(work_copy)


def test_connector_detected_from_tensors(tmp_path, manifest):
    config = {k: v for k, v in manifest["config"].items() if k != "mm_projector_type"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for variant in ("SparseConv_1", "MSCC"):
        header = {n: (s, d) for n, (s, d, _k) in manifest_tensors(variant).items()}
        cfg, name = read_release_config(tmp_path, header)
        assert cfg.connector == variant
        assert name == {"SparseConv_1": "unigeoseg-official-sparseconv",
                        "MSCC": "unigeoseg-official-mscc"}[variant]
        assert cfg.language["vocab_size"] == 50297
    with pytest.raises(WeightsError, match="mm_projector_type"):
        read_release_config(tmp_path, {})


def test_save_refuses_a_tokenizer_without_seg(tmp_path):
    with pytest.raises(ValueError, match=r"\[SEG\]"):
        save_released(random_model(TINY_SPARSE), make_tokenizer(with_seg=False),
                      tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ====================================================================== full size, random


SHARD_BYTES = 2 << 30
_GIB = 1 << 30


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / _GIB  # KiB on Linux


def _random_tensor(name: str, shape: tuple[int, ...], dtype: str,
                   gen: torch.Generator) -> torch.Tensor:
    if dtype == "int64":
        assert name.endswith("relative_position_index"), name
        window = math.isqrt(shape[0])
        index = relative_position_index(window)  # the model's own (standard Swin) buffer
        assert tuple(index.shape) == shape
        return index
    tensor = torch.empty(shape, dtype=torch.float32)
    tensor.uniform_(-0.05, 0.05, generator=gen)
    return tensor.to(getattr(torch, dtype))


def _write_shard(folder: Path, file: str, specs: dict, gen: torch.Generator,
                 probes: dict[str, torch.Tensor]) -> int:
    tensors = {n: _random_tensor(n, s, d, gen) for n, (s, d, _k) in specs.items()}
    for name in probes:
        if name in tensors:
            probes[name] = tensors[name].clone()
    save_file(tensors, str(folder / file), metadata={"format": "pt"})
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    del tensors
    gc.collect()
    return size


def _manifest_shards(specs: dict) -> list[list[str]]:
    shards, current, used = [], [], 0
    for name, (shape, dtype, _kind) in specs.items():
        if name.startswith("model.mm_projector."):
            continue
        size = math.prod(shape) * getattr(torch, dtype).itemsize
        if current and used + size > SHARD_BYTES:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    shards.append(current)
    return shards


def _write_index_and_config(folder: Path, weight_map: dict[str, str], total: int,
                            config: dict) -> None:
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                            "weight_map": dict(sorted(weight_map.items()))}))
    (folder / "config.json").write_text(json.dumps({"architectures": ["UniGeoSeg"], **config}))


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_full_size_random_checkpoint_loads_strictly(tmp_path):
    """The released layout at full size, both connectors, float32 on CPU, one at a time."""
    try:
        _full_size_check(tmp_path)
    finally:  # 6 GiB per run: do not leave it to pytest's retention of old tmp folders
        clear_cache()
        for folder in ("sparseconv", "mscc"):
            shutil.rmtree(tmp_path / folder, ignore_errors=True)


def _full_size_check(tmp_path: Path) -> None:
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    sparse = manifest_tensors("SparseConv_1")
    mscc = manifest_tensors("MSCC")
    connector = "model.mm_projector."
    common = {n: v for n, v in sparse.items() if not n.startswith(connector)}
    assert common == {n: v for n, v in mscc.items() if not n.startswith(connector)}

    shards = _manifest_shards(sparse)
    count = len(shards) + 1  # + the connector's own shard
    files = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    gen = torch.Generator().manual_seed(0)
    probe_names = ["model.layers.3.self_attn.query_key_value.weight",
                   "model.layers.3.self_attn.query_key_value.bias",
                   "model.vision_tower.layers.2.blocks.5.attn.relative_position_bias_table",
                   "model.vision_tower.layers.2.blocks.5.attn.relative_position_index",
                   "intera_fuse.weight", "global_latents", "pixel_decoder.mask_features.weight"]
    probes: dict[str, torch.Tensor] = dict.fromkeys(probe_names)  # type: ignore[arg-type]
    connector_probes: dict[str, dict[str, torch.Tensor]] = {
        "SparseConv_1": dict.fromkeys([connector + "fc.weight", connector + "norm2.weight"]),
        "MSCC": dict.fromkeys([connector + "fc.weight", connector + "global_tokens"])}

    tokenizer = make_tokenizer()
    assert len(tokenizer) <= 50297 and seg_token_id(tokenizer) < 50297
    folders = {"SparseConv_1": tmp_path / "sparseconv", "MSCC": tmp_path / "mscc"}
    for folder in folders.values():
        folder.mkdir()
        tokenizer.save_pretrained(str(folder))

    common_map: dict[str, str] = {}
    common_total = 0
    for names, file in zip(shards, files[:-1], strict=True):
        common_total += _write_shard(folders["SparseConv_1"], file,
                                     {n: sparse[n] for n in names}, gen, probes)
        common_map.update(dict.fromkeys(names, file))
        os.link(folders["SparseConv_1"] / file, folders["MSCC"] / file)
    for variant, specs in (("SparseConv_1", sparse), ("MSCC", mscc)):
        own = {n: v for n, v in specs.items() if n.startswith(connector)}
        total = common_total + _write_shard(folders[variant], files[-1], own, gen,
                                            connector_probes[variant])
        config = dict(load_manifest(variant)["config"], mm_projector_type=variant)
        _write_index_and_config(folders[variant], {**common_map, **dict.fromkeys(own, files[-1])},
                                total, config)
    timings["write"] = time.perf_counter() - t0
    written_gib = sum(f.stat().st_size for f in folders["SparseConv_1"].glob("*.safetensors"))
    print(f"\nwrote {count} shards, {written_gib / _GIB:.2f} GiB (SparseConv_1) in "
          f"{timings['write']:.1f} s; peak RSS so far {_peak_rss_gib():.2f} GiB")
    assert os.stat(folders["MSCC"] / files[0]).st_ino == os.stat(
        folders["SparseConv_1"] / files[0]).st_ino

    peaks = {}
    for variant, specs in (("SparseConv_1", sparse), ("MSCC", mscc)):
        t1 = time.perf_counter()
        loaded = load_released(folders[variant], device="cpu", dtype=torch.float32)
        timings[variant] = time.perf_counter() - t1
        peaks[variant] = _peak_rss_gib()
        model = loaded.model
        expected_name = ("unigeoseg-official-sparseconv" if variant == "SparseConv_1"
                         else "unigeoseg-official-mscc")
        assert loaded.name == expected_name and loaded.config == official_config(variant)

        # zero missing / unexpected: the model's state dict in the released naming is the manifest
        meta = {n: torch.empty(t.shape, dtype=t.dtype, device="meta")
                for n, t in model.state_dict().items()}
        released = model_to_released(meta, num_heads=32)
        assert set(released) == set(specs)
        assert all(tuple(released[n].shape) == specs[n][0] for n in specs)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert_parameters_are_the_saved_tensors(model)

        # values: fused q/k/v rows (per-head interleaved), a bf16 tensor, buffers, connector
        attn = model.model.layers[3].self_attn
        fused_w = probes["model.layers.3.self_attn.query_key_value.weight"]
        fused_b = probes["model.layers.3.self_attn.query_key_value.bias"]
        for h in (0, 7, 31):
            base = 3 * 64 * h
            assert torch.equal(attn.q_proj.weight[64 * h:64 * (h + 1)], fused_w[base:base + 64])
            assert torch.equal(attn.k_proj.weight[64 * h:64 * (h + 1)],
                               fused_w[base + 64:base + 128])
            assert torch.equal(attn.v_proj.bias[64 * h:64 * (h + 1)],
                               fused_b[base + 128:base + 192])
        state = model_to_released(model.state_dict(), num_heads=32, fused_qkv=False)
        for name, value in {**probes, **connector_probes[variant]}.items():
            if name.startswith("model.layers."):
                continue  # checked above, in the split naming
            assert value is not None and name in specs, name
            assert torch.equal(state[name], value.to(state[name].dtype)), name
        assert probes["intera_fuse.weight"].dtype == torch.bfloat16
        index = model.model.vision_tower.layers[2].blocks[5].attn.relative_position_index
        assert index.dtype == torch.int64 and torch.equal(index, relative_position_index(12))

        if variant == "SparseConv_1":
            # ... and the loaded full-size model segments a tile end to end, through the same
            # engine the service and the CLI run.
            from unigeoseg_backend.engines.base import TilePrompt
            from unigeoseg_backend.engines.unigeoseg_engine import UniGeoSegEngine

            engine = UniGeoSegEngine(loaded, torch.device("cpu"))
            tile = np.random.default_rng(1).integers(0, 255, (300, 400, 3), dtype=np.uint8)
            t2 = time.perf_counter()
            prediction = engine.decode(engine.encode(tile),
                                       TilePrompt(task="referring", text="the pond"))
            timings["segment_s"] = time.perf_counter() - t2
            assert prediction.mask.shape == (300, 400) and prediction.mask.dtype == bool
            del engine, prediction

        del model, attn, state, index, loaded, meta, released
        clear_cache()
        gc.collect()

    print(f"full-size tile segmented in {timings['segment_s']:.1f} s")
    print(f"load SparseConv_1 {timings['SparseConv_1']:.1f} s, MSCC {timings['MSCC']:.1f} s; "
          f"peak RSS after SparseConv_1 {peaks['SparseConv_1']:.2f} GiB, after MSCC "
          f"{peaks['MSCC']:.2f} GiB; total {time.perf_counter() - t0:.1f} s")
    assert max(peaks.values()) < 16.0
