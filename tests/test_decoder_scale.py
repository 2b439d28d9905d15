"""A 32-layer decoder through the real cached flow: a fixed selection is extracted alone, with early
exit at its deepest layer, in small chunks, bit-identical to slicing an all-layer extraction."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from layerfusion.callbacks import LayerSelection

from layerfusion.data.datamodule import TextClassificationDataModule
from layerfusion.encoders.frozen import EncoderSpec
from layerfusion.features.cache import FeatureCache, open_entry
from layerfusion.module import LayerFusionModule

SELECTED = [3, 17, 30]
CHUNK_ROWS = 16


@pytest.fixture(scope="module")
def deep_decoder(tmp_path_factory, minilm_dir) -> str:
    """A random Llama with 32 blocks (hidden states 0..32), 32 wide, with MiniLM's tokenizer."""
    from transformers import AutoModel, LlamaConfig

    path = tmp_path_factory.mktemp("deep") / "llama32"
    vocab = json.loads((Path(minilm_dir) / "config.json").read_text())["vocab_size"]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        pad_token_id=0,
        bos_token_id=101,
        eos_token_id=102,
    )
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (Path(minilm_dir) / f).exists():
            shutil.copy(Path(minilm_dir) / f, path / f)
    return str(path)


@pytest.fixture
def one_thread():
    """Tiny matrices: one intra-op thread (two threads spinning on a busy machine took 25x longer here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
@pytest.mark.filterwarnings("ignore:Found \\d+ module\\(s\\) in eval mode at the start of training")
@pytest.mark.filterwarnings("ignore:The '\\w+_dataloader' does not have many workers")
def test_fixed_selection_of_a_32_layer_decoder(tmp_path, deep_decoder, sst2_slice, one_thread):
    L.seed_everything(0)
    specs = [EncoderSpec(deep_decoder, pooling="last", max_length=32, alias="llama")]
    dm = TextClassificationDataModule(dataset=str(sst2_slice), encoders=specs, batch_size=32)
    model = LayerFusionModule(
        specs,
        label_names=dm.label_names,
        hidden=16,
        cache_dir=str(tmp_path / "cache"),
        cache_chunk_rows=CHUNK_ROWS,
    )
    encoder = model.encoders["llama"]
    assert encoder.num_layers == 33
    blocks = encoder.model.layers
    runs = [0] * len(blocks)
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda m, a, o, i=i: runs.__setitem__(i, runs[i] + 1))
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[LayerSelection(strategy="fixed", layers={"llama": SELECTED})],
    )
    trainer.fit(model, dm)
    trainer.test(model, dm, verbose=False)
    assert model.selection == {"llama": SELECTED}

    # early exit: blocks 0..29 make hidden states 1..30; blocks 30 and 31 never ran
    assert min(runs[:30]) > 0 and runs[30:] == [0, 0], runs

    # each split's entry holds the three selected layers only, in chunks of 16 rows
    manifests = {
        m["key"]["split"]: (p.parent, m)
        for p in (tmp_path / "cache").rglob("manifest.json")
        for m in [json.loads(p.read_text())]
    }
    assert sorted(manifests) == ["test", "train", "val"]
    for split, rows in (("train", 200), ("val", 80), ("test", 80)):
        entry, manifest = manifests[split]
        assert manifest["layers"] == SELECTED and manifest["shape"] == [rows, 3, 32]
        assert [c["rows"] for c in manifest["chunks"]] == [16] * (rows // 16) + (
            [rows % 16] if rows % 16 else []
        )
        assert entry.name.split("-")[-1].startswith("S")

    # bit-identical to the same layers sliced from an all-layer extraction
    for split in ("train", "val"):
        full = FeatureCache(tmp_path / "full", chunk_rows=CHUNK_ROWS).load_or_build(
            encoder, dm.texts(split), split
        )
        assert full.shape == (len(dm.texts(split)), 33, 32)
        selected = open_entry(manifests[split][0])
        assert torch.equal(selected[:], full[:, SELECTED])
    assert runs[30:] != [0, 0]  # the all-layer extraction did run them
