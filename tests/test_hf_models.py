"""Hugging Face models into and out of the pipeline: real tiny checkpoints saved with save_pretrained.

Tolerance: fp32 on CPU, pipeline layers vs. the HF model's own forward, atol 1e-5 (they run the same
kernels, so the difference is 0 in practice).
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_job, write_config
from ds_checkfree.data import HFTokenizer, build_data, make_tokenizer
from ds_checkfree.data.tokenizer import _line_chunks
from ds_checkfree.models.hf import HFModelError, build_sequential, export_hf, load_hf_parts
from hf_fixtures import ARCHITECTURES, SENTENCES, load_hf_model, make_hf_dir, sample_ids

ATOL = 1e-5


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_hf_dir(tmp_path_factory.mktemp("llama"), "llama")


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_pipeline_layers_equal_hf_forward_and_export_reloads(arch, tmp_path):
    """head + blocks + tail built from the specs compute the HF model's logits (Mistral and Qwen2
    with sequences longer than their sliding windows); the export reloads with the same logits."""
    src = make_hf_dir(tmp_path / "src", arch)
    parts = load_hf_parts(src)
    assert parts.architecture == load_hf_model(src).__class__.__name__
    seq = build_sequential(parts).eval()
    ids = sample_ids(parts.config.vocab_size, seq_len=12)
    with torch.no_grad():
        ours, theirs = seq(ids), load_hf_model(src)(ids).logits
    assert torch.allclose(ours, theirs, atol=ATOL), (ours - theirs).abs().max()

    with torch.no_grad():  # a trained model is not the source: move every weight before exporting
        for p in seq.parameters():
            p.add_(0.01 * torch.randn_like(p))
        ours = seq(ids)
    out = export_hf(seq, src, tmp_path / "out")
    reloaded = load_hf_model(out)
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, ours, atol=ATOL)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # GPT-2 / Qwen2: the pipeline's head is untied
    assert (out / "tokenizer.json").is_file() and (out / "generation_config.json").is_file()


def test_each_layer_reads_only_its_own_tensors(llama_dir, tmp_path):
    """A directory holding only block 2's tensors builds block 2 and nothing else."""
    parts = load_hf_parts(llama_dir)
    full = load_file(str(llama_dir / "model.safetensors"))
    only = tmp_path / "only_block2"
    only.mkdir()
    (only / "config.json").write_text((llama_dir / "config.json").read_text())
    save_file({k: v for k, v in full.items() if k.startswith("model.layers.2.")}, str(only / "model.safetensors"))
    part = load_hf_parts(only)
    block = part.blocks[2].build()
    assert set(block.hf_state_dict()) == {k for k in full if k.startswith("model.layers.2.")}
    assert all(torch.equal(v, full[k]) for k, v in block.hf_state_dict().items())
    with pytest.raises(HFModelError, match="model.layers.1"):
        part.blocks[1].build()
    assert len(parts.blocks) == 4


def test_sharded_checkpoint_loads(tmp_path):
    """A model saved in several shards (model.safetensors.index.json) loads layer by layer."""
    src = make_hf_dir(tmp_path / "one", "llama")
    sharded = tmp_path / "sharded"
    load_hf_model(src).save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    ids = sample_ids(200)
    with torch.no_grad():
        assert torch.equal(build_sequential(load_hf_parts(sharded, tokenizer=False)).eval()(ids),
                           build_sequential(load_hf_parts(src)).eval()(ids))


def test_building_on_meta_reads_nothing(llama_dir, tmp_path):
    """Shape checks build specs on the meta device: no tensor is read (the weights may be gone)."""
    parts = load_hf_parts(llama_dir)
    (llama_dir / "model.safetensors").rename(tmp_path / "moved")
    try:
        with torch.device("meta"):
            block = parts.blocks[0].build()
        assert all(p.is_meta for p in block.parameters())
    finally:
        (tmp_path / "moved").rename(llama_dir / "model.safetensors")


def _one_line_error(hf_dir, *fragments):
    with pytest.raises(HFModelError) as err:
        load_hf_parts(hf_dir)
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, ValueError)
    for fragment in fragments:
        assert fragment in message, message


def test_bad_directories_fail_in_one_line(tmp_path):
    _one_line_error(tmp_path / "nowhere", "directory not found", "save_pretrained")
    (tmp_path / "empty").mkdir()
    _one_line_error(tmp_path / "empty", "no config.json")

    no_weights = make_hf_dir(tmp_path / "no_weights", "llama")
    (no_weights / "model.safetensors").unlink()
    _one_line_error(no_weights, "no safetensors weights", "save_pretrained")
    torch.save({}, no_weights / "pytorch_model.bin")
    _one_line_error(no_weights, "only PyTorch .bin weights", "save_pretrained")

    bert = make_hf_dir(tmp_path / "bert", "llama")
    config = json.loads((bert / "config.json").read_text())
    config.update(model_type="bert", architectures=["BertForMaskedLM"])
    (bert / "config.json").write_text(json.dumps(config))
    _one_line_error(bert, "'BertForMaskedLM'", "not supported", "LlamaForCausalLM", "MistralForCausalLM",
                    "Qwen2ForCausalLM", "GPT2LMHeadModel")

    small_vocab = make_hf_dir(tmp_path / "small_vocab", "gpt2", vocab_size=20)
    _one_line_error(small_vocab, "vocab_size is 20", "resize_token_embeddings")


def test_export_refuses_a_partial_model(llama_dir, tmp_path):
    seq = build_sequential(load_hf_parts(llama_dir))
    with pytest.raises(HFModelError, match="missing"):
        export_hf(list(seq)[1:], llama_dir, tmp_path / "out")


def test_hf_tokenizer_feeds_the_data_pipeline(llama_dir, tmp_path):
    tok = make_tokenizer(f"hf:{llama_dir}")
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == len(load_hf_parts(llama_dir).tokenizer)
    text = "\n".join(SENTENCES * 40)
    ids = tok.encode(text)
    assert ids.dtype == torch.int64 and tok.decode(ids[:9]) == SENTENCES[0]
    assert "".join(_line_chunks(text, 100)) == text and len(_line_chunks(text, 100)) > 10
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    data = build_data(str(corpus), 8, 2, tokenizer=f"hf:{llama_dir}")
    x, y = data.train.micro_batch(0)
    assert data.tokenizer.vocab_size == tok.vocab_size and int(x.max()) < tok.vocab_size
    assert data.num_train_tokens + data.num_val_tokens == ids.numel()
    assert make_tokenizer(None).vocab_size == 256  # bytes stay the presets' default
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        make_tokenizer(f"hf:{tmp_path}")


def test_pipeline_of_four_ranks_matches_hf_and_exports(tmp_path):
    """Real 4-rank job (gloo): the pipeline built from hf:DIR has the HF model's loss on the same
    batch, trains, exports from every stage, and transformers reloads exactly its final weights."""
    src = make_hf_dir(tmp_path / "src", "llama", vocab_size=200, hidden=32, layers=4)
    window = sample_ids(200, batch=4, seq_len=17)
    torch.save(window, tmp_path / "batch.pt")
    config = write_config(tmp_path / "ds.json", ds_gradient_accumulation_steps=2)
    run_job("torchrun", 4, "tests/workers/hf_pipeline_worker.py",
            ["--config", str(config), "--hf_dir", str(src), "--batch", str(tmp_path / "batch.pt"),
             "--export", str(tmp_path / "export"), "--out", str(tmp_path / "ranks"), "--steps", "2"], timeout=300)
    ranks = [torch.load(tmp_path / "ranks" / f"rank{r}.pt") for r in range(4)]
    with torch.no_grad():
        hf_loss = load_hf_model(src)(window, labels=window).loss.item()
        assert ranks[-1]["first_loss"] == pytest.approx(hf_loss, abs=ATOL)

        reloaded = load_hf_model(tmp_path / "export")
        index = json.loads((tmp_path / "export" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) == 4  # one shard per stage
        state = reloaded.state_dict()
        owned = {k: v for r in ranks for k, v in r["owned"].items()}
        assert set(owned) == set(state)
        assert all(torch.equal(state[k], v) for k, v in owned.items())
        assert not torch.equal(state["model.layers.2.mlp.up_proj.weight"],
                               load_hf_model(src).state_dict()["model.layers.2.mlp.up_proj.weight"])  # it trained
        assert reloaded(window, labels=window).loss.item() == pytest.approx(ranks[-1]["final_loss"], abs=ATOL)


def test_hf_source_answers_what_a_run_asks(llama_dir):
    """``--model hf:DIR`` (models.sources): parts that pass the pipeline's checks, the facts a run
    reads before any process group, and a one-line refusal of preset-only overrides."""
    from ds_checkfree.models.sources import resolve_model
    from ds_checkfree.pipe.parts import check_parts

    source = resolve_model(f"hf:{llama_dir}")
    check_parts(source.parts())
    assert (source.num_blocks, source.vocab_size, source.max_seq_len) == (4, 200, 128)
    assert source.tokenizer == f"hf:{llama_dir}"
    assert source.num_parameters() == sum(p.numel() for p in load_hf_model(llama_dir).parameters())
    assert resolve_model(f"hf:{llama_dir}", {"max_seq_len": 32}).max_seq_len == 32
    with pytest.raises(HFModelError, match="only max_seq_len"):
        resolve_model(f"hf:{llama_dir}", {"num_layers": 2})
