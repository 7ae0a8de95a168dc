"""Host batching: tokenization with BOS, dropping of over-long prompts, left-padded buckets, a seeded iterator
whose 3-integer position restores exactly, and per-host shares of each global batch."""
import dataclasses
import json
import logging

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import generated_prompts as gen
from rre_jax import data
from rre_jax.data import batching


@pytest.fixture(scope="module")
def tokenizer():
    """A small byte-level BPE trained here, adding BOS like LLaMA's tokenizer; pad id 3."""
    texts = [r.instruction + "\n" + r.reference for r in data.load_prompts(data.tiny_prompts_path())]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts + [data.alpaca_prompt("")], trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny(tokenizer):
    records = data.load_prompts(data.tiny_prompts_path())
    return records, data.tokenize_prompts(records, tokenizer, max_prompt_length=128)


def test_tokenize_adds_bos_and_matches_single_calls(tokenizer, tiny):
    records, prompts = tiny
    assert len(prompts) == 64 and prompts.dropped == () and prompts.pad_id == 3
    for i in (0, 23, 63):
        single = tokenizer(data.alpaca_prompt(records[i].instruction))["input_ids"]
        assert single[0] == tokenizer.bos_token_id and prompts.ids[i].tolist() == single
        assert tokenizer.decode(prompts.ids[i][1:]) == data.alpaca_prompt(records[i].instruction)
    assert prompts.qtype.tolist() == [r.qtype_id for r in records]
    assert prompts.lengths.tolist() == [len(x) for x in prompts.ids]


@pytest.fixture(scope="module")
def farm(tmp_path_factory):
    """A generated AlpacaFarm file (400 prompts, some with contexts far beyond 512 tokens), as loaded."""
    path = tmp_path_factory.mktemp("farm") / "alpacafarm.json"
    path.write_text(json.dumps(gen.alpacafarm_records(400)), encoding="utf-8")
    return data.load_prompts(path)


def test_overlong_prompts_dropped_and_reported(farm, tokenizer, caplog):
    records = farm
    lengths = [len(tokenizer(data.alpaca_prompt(r.instruction))["input_ids"]) for r in records]
    limit = sorted(lengths)[-6]  # five prompts are longer, at least one has exactly `limit` tokens
    expected = [i for i, n in enumerate(lengths) if n >= limit]
    with caplog.at_level(logging.WARNING, logger="rre_jax.data.batching"):
        prompts = data.tokenize_prompts(records, tokenizer, max_prompt_length=limit)
    assert list(prompts.dropped) == expected and len(expected) >= 6
    assert f"dropped {len(expected)} of 400 prompts with >= {limit} tokens" in caplog.text
    assert str(expected[:5]) in caplog.text
    assert prompts.index.tolist() == [i for i in range(400) if i not in expected]
    assert prompts.lengths.max() < limit
    one_more = data.tokenize_prompts(records, tokenizer, max_prompt_length=limit + 1)
    assert len(one_more.dropped) == len(expected) - lengths.count(limit)  # exactly-at-limit ones now kept


def test_default_limit_drops_only_long_prompts(farm, tokenizer):
    records = farm
    lengths = [len(tokenizer(data.alpaca_prompt(r.instruction))["input_ids"]) for r in records]
    long = [i for i, n in enumerate(lengths) if n >= 512]
    assert 0 < len(long) < len(records) // 5  # the file holds some prompts past the paper's limit, not many
    prompts = data.tokenize_prompts(records, tokenizer)  # max_prompt_length=512 as in the paper
    assert list(prompts.dropped) == long and len(prompts) + len(prompts.dropped) == len(records)
    assert prompts.index.tolist() == [i for i in range(len(records)) if i not in long]
    assert prompts.lengths.tolist() == [n for n in lengths if n < 512]


def test_tokenizer_without_pad_is_an_error(tokenizer, tiny):
    records, _ = tiny
    no_pad = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>")
    with pytest.raises(ValueError, match="no pad_token_id; set tokenizer.pad_token"):
        data.tokenize_prompts(records, no_pad)


def test_bucket_lengths():
    assert batching.bucket_lengths(512) == (64, 128, 192, 256, 320, 384, 448, 512)
    assert batching.bucket_lengths(512, multiple=None) == (16, 32, 64, 128, 256, 512)
    assert batching.bucket_lengths(100, multiple=None, min_length=8) == (8, 16, 32, 64, 100)


def _check_left_padded(batch, prompts):
    T = batch.ids_BxT.shape[1]
    assert batch.ids_BxT.dtype == np.int32 and batch.mask_BxT.shape == batch.ids_BxT.shape
    for b, idx in enumerate(batch.index_B):
        row = np.flatnonzero(prompts.index == idx)[0]
        n = prompts.lengths[row]
        assert batch.length_B[b] == n and batch.qtype_B[b] == prompts.qtype[row]
        assert batch.mask_BxT[b].tolist() == [0] * (T - n) + [1] * n
        assert batch.ids_BxT[b, T - n:].tolist() == prompts.ids[row].tolist()
        assert (batch.ids_BxT[b, :T - n] == prompts.pad_id).all()


def test_batches_left_padded_into_buckets(tiny):
    _, prompts = tiny
    config = data.BatchingConfig(global_batch_size=8, max_prompt_length=128, bucket_multiple=None, min_bucket=16)
    it = data.PromptIterator(prompts, config)
    shapes = set()
    for _ in range(3 * it.steps_per_epoch):
        batch = next(it)
        _check_left_padded(batch, prompts)
        T = batch.ids_BxT.shape[1]
        assert T in config.buckets and T >= batch.length_B.max()
        assert T == min(b for b in config.buckets if b >= batch.length_B.max())  # smallest bucket that fits
        shapes.add(batch.ids_BxT.shape)
    assert len(shapes) <= len(config.buckets)


def test_epochs_are_permutations_and_seeded(tiny):
    _, prompts = tiny
    config = data.BatchingConfig(global_batch_size=10, max_prompt_length=128, seed=3)
    it = data.PromptIterator(prompts, config)
    assert it.steps_per_epoch == 6
    epoch0 = [next(it) for _ in range(6)]
    seen = np.concatenate([b.index_B for b in epoch0])
    assert len(set(seen.tolist())) == 60 and all(b.epoch == 0 for b in epoch0)
    assert next(it).epoch == 1 and it.state == data.IteratorState(epoch=1, step=1, seed=3)
    again = data.PromptIterator(prompts, config)
    assert all((next(again).index_B == b.index_B).all() for b in epoch0)
    other = data.PromptIterator(prompts, dataclasses.replace(config, seed=4))
    assert not all((next(other).index_B == b.index_B).all() for b in epoch0)
    assert not np.array_equal(it.batch_at(1, 0).index_B, epoch0[0].index_B)  # a fresh order per epoch


def test_restored_position_gives_same_subsequent_batches(tiny):
    _, prompts = tiny
    config = data.BatchingConfig(global_batch_size=8, max_prompt_length=128, seed=11)
    it = data.PromptIterator(prompts, config)
    for _ in range(13):  # into the second epoch (8 steps per epoch)
        next(it)
    saved = json.loads(json.dumps(dataclasses.asdict(it.state)))
    assert saved == {"epoch": 1, "step": 5, "seed": 11}
    expected = [next(it) for _ in range(6)]  # crosses into epoch 2
    restored = data.PromptIterator(prompts, dataclasses.replace(config, seed=0), state=data.IteratorState(**saved))
    for want in expected:
        got = next(restored)
        assert (got.epoch, got.step) == (want.epoch, want.step)
        np.testing.assert_array_equal(got.ids_BxT, want.ids_BxT)
        np.testing.assert_array_equal(got.index_B, want.index_B)
    with pytest.raises(ValueError, match="outside this prompt set"):
        data.PromptIterator(prompts, config, state=data.IteratorState(epoch=0, step=8, seed=11))


@pytest.mark.parametrize("process_count", [2, 4])
def test_per_host_shares_partition_the_global_batch(tiny, process_count):
    _, prompts = tiny
    config = data.BatchingConfig(global_batch_size=16, max_prompt_length=128, seed=5)
    whole = data.PromptIterator(prompts, config)
    hosts = [data.PromptIterator(prompts, config, process_index=p, process_count=process_count)
             for p in range(process_count)]
    for _ in range(6):
        g = next(whole)
        shares = [next(h) for h in hosts]
        assert all(s.ids_BxT.shape == (16 // process_count, g.ids_BxT.shape[1]) for s in shares)  # same T
        np.testing.assert_array_equal(np.concatenate([s.index_B for s in shares]), g.index_B)
        np.testing.assert_array_equal(np.concatenate([s.ids_BxT for s in shares]), g.ids_BxT)
        np.testing.assert_array_equal(np.concatenate([s.mask_BxT for s in shares]), g.mask_BxT)
        assert len(set(np.concatenate([s.index_B for s in shares]).tolist())) == 16  # disjoint
    with pytest.raises(ValueError, match="split evenly over process_count=3"):
        data.PromptIterator(prompts, config, process_index=0, process_count=3)
    with pytest.raises(ValueError, match="fewer than global_batch_size=128"):
        data.PromptIterator(prompts, dataclasses.replace(config, global_batch_size=128))


def test_eval_batches_cover_every_prompt_once_in_order(tiny):
    _, prompts = tiny
    config = data.BatchingConfig(global_batch_size=12, max_prompt_length=128)
    batches = list(data.eval_batches(prompts, config))
    assert len(batches) == 6 and all(b.ids_BxT.shape[0] == 12 for b in batches)
    valid = np.concatenate([b.index_B[b.valid_B] for b in batches])
    assert valid.tolist() == list(range(64)) and batches[-1].valid_B.sum() == 4
    for b in batches:
        _check_left_padded(b, prompts)
    halves = [list(data.eval_batches(prompts, config, process_index=p, process_count=2)) for p in range(2)]
    for b, h0, h1 in zip(batches, *halves):
        np.testing.assert_array_equal(np.concatenate([h0.ids_BxT, h1.ids_BxT]), b.ids_BxT)
        np.testing.assert_array_equal(np.concatenate([h0.valid_B, h1.valid_B]), b.valid_B)


def test_prompts_longer_than_the_batching_limit_fail_early(tiny):
    _, prompts = tiny
    config = data.BatchingConfig(global_batch_size=8, max_prompt_length=int(prompts.lengths.max()) - 1)
    with pytest.raises(ValueError, match="exceed BatchingConfig.max_prompt_length"):
        data.PromptIterator(prompts, config)
    with pytest.raises(ValueError, match="exceed BatchingConfig.max_prompt_length"):
        data.eval_batches(prompts, config)
