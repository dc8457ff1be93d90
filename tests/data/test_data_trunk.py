"""Logits only where scored, and the frozen-trunk cache: both must equal the full ``lm(...).logits`` pass.

Tolerance 1e-5 nats plus 1e-6 relative: the same float32 math in a different grouping (the head on
gathered rows, the trunk on a row subset of a different width), i.e. round-off of a few ulps (float32
ulp at 100 nats is 7.6e-6) on sums of ~10 terms.
"""

import pytest
import torch

from abmll_pyro.config import AdapterConfig
from abmll_pyro.data.encoding import encode_options
from abmll_pyro.data.packing import log_prob_of
from abmll_pyro.data.scoring import option_scores
from abmll_pyro.data.tasks import Example
from abmll_pyro.data.trunk import TrunkCache, attach_trunk_cache, detach_trunk_cache, first_live_block
from abmll_pyro.data.decoder import decoder_of
from abmll_pyro.lms import tiny_model
from abmll_pyro.lora.adapter import BayesLoRA

EXAMPLES = [
    Example("The capital of France is", ("Paris", "Rome", "a city in Spain"), 0),
    Example("2 + 2 =", ("4", "five"), 0),
    Example("Colours:", ("red", "green", "blue", "yellow", "a long purple thing"), 3),
]
TOP = {"llama": "model.layers.1.self_attn.", "qwen2": "model.layers.1.self_attn.", "gpt2": "transformer.h.1.attn."}
TARGETS = {"llama": ("q_proj", "v_proj"), "qwen2": ("q_proj", "v_proj"), "gpt2": ("c_attn",)}
TOL = 1e-5


def full_logits_reference(lm, batch, packed):
    """The old path: the head at every position, then pick (the oracle)."""
    if packed:
        p = batch.packed
        logits = lm(input_ids=p.input_ids, attention_mask=p.attention_mask(torch.float32),
                    position_ids=p.position_ids).logits
        n, m = p.first_token.shape
        seg = p.segment
        total = log_prob_of(logits[torch.arange(n), p.prompt_len - 1].unsqueeze(1).expand(-1, m, -1), p.first_token)
        rest = log_prob_of(logits[:, :-1], p.input_ids[:, 1:])
        same = (seg[:, :-1] > 0) & (seg[:, 1:] == seg[:, :-1])
        total = total.scatter_add(1, (seg[:, :-1] - 1).clamp_min(0), torch.where(same, rest, 0.0))
        total = total[:, : batch.max_options]
    else:
        logits = lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        picked = log_prob_of(logits[:, :-1], batch.input_ids[:, 1:])
        per_row = torch.where(batch.target_mask[:, 1:], picked, 0.0).sum(-1)
        total = per_row.new_zeros(len(batch), batch.max_options).index_put((batch.row_example, batch.row_option), per_row)
    slots = torch.arange(total.shape[1])
    return total.masked_fill(slots >= batch.num_options[:, None], float("-inf"))


def top_block_adapter(kind, lm):
    names = tuple(TOP[kind] + t for t in TARGETS[kind])
    adapter = BayesLoRA(lm, AdapterConfig(rank=2, lora_alpha=4.0, target_modules=names, init_std=0.05))
    with torch.no_grad():  # a non-zero mean so the adapted pass differs from the base model
        for k, v in adapter.factors.items():
            if k.endswith("mu_B"):
                v.normal_(0, 0.5)
    return adapter


def assert_close(a, b):
    finite = a.isfinite()
    assert torch.equal(finite, b.isfinite())
    assert torch.allclose(a[finite], b[finite], rtol=1e-6, atol=TOL)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("packed", [True, False])
def test_head_only_at_scored_positions_is_exact(kind, packed):
    lm, tok = tiny_model(kind)
    batch = encode_options(tok, EXAMPLES)
    with torch.no_grad():
        assert_close(option_scores(lm, batch, packed=packed), full_logits_reference(lm, batch, packed))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("packed", [True, False])
def test_trunk_cache_is_exact_values_and_gradients(kind, packed):
    lm, tok = tiny_model(kind)
    batch = encode_options(tok, EXAMPLES)
    adapter = top_block_adapter(kind, lm)
    g = torch.Generator().manual_seed(1)
    deltas = {m: d.requires_grad_(True) for m, d in adapter.sample_deltas(adapter.global_params(), g).items()}
    results = []
    for cached in (False, True, True):  # off, cold cache, warm cache
        if cached and not results[1:]:
            cache = attach_trunk_cache(lm)
        with adapter.use(deltas):
            scores = option_scores(lm, batch, packed=packed)
            grads = torch.autograd.grad(scores[scores.isfinite()].sum(), list(deltas.values()))
        results.append((scores.detach(), grads))
    reference = full_logits_reference_under(adapter, deltas, lm, batch, packed)
    assert_close(results[0][0], reference)
    for scores, grads in results[1:]:
        assert_close(scores, results[0][0])
        for a, b in zip(grads, results[0][1]):
            assert torch.allclose(a, b, rtol=1e-5, atol=TOL)
    decoder = decoder_of(lm)
    with adapter.use(deltas):
        assert first_live_block(decoder) == 1
    assert cache.misses == len(batch.packed.input_ids if packed else batch.input_ids)
    assert cache.hits == cache.misses  # the warm pass read every row
    detach_trunk_cache(lm)


def full_logits_reference_under(adapter, deltas, lm, batch, packed):
    with adapter.use(deltas), torch.no_grad():
        return full_logits_reference(lm, batch, packed)


def test_cache_covers_the_whole_model_when_nothing_is_adapted_and_drops_on_weight_change():
    lm, tok = tiny_model("llama")
    batch = encode_options(tok, EXAMPLES)
    cache = attach_trunk_cache(lm)
    decoder = decoder_of(lm)
    assert first_live_block(decoder) == 0  # a fresh model's weights are trainable: nothing is cached
    lm.requires_grad_(False)
    assert first_live_block(decoder) == decoder.num_blocks
    with torch.no_grad():
        assert_close(option_scores(lm, batch), full_logits_reference(lm, batch, True))
        lm.model.layers[0].mlp.up_proj.weight.mul_(1.5)  # an in-place edit of a frozen weight
        assert_close(option_scores(lm, batch), full_logits_reference(lm, batch, True))
    assert cache.hits == 0  # the edit invalidated every entry
    # a forward hook or a trainable weight in block 0 makes the whole model live
    lm.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    assert first_live_block(decoder) == 0
    lm.model.layers[0].mlp.up_proj.weight.requires_grad_(False)
    handle = lm.model.layers[0].register_forward_hook(lambda m, i, o: o)
    assert first_live_block(decoder) == 0
    handle.remove()


def test_lru_bound_and_disk_copy(tmp_path):
    lm, tok = tiny_model("qwen2")
    batch = encode_options(tok, EXAMPLES)
    adapter = top_block_adapter("qwen2", lm)
    with adapter.use(adapter.mean_deltas(adapter.global_params())), torch.no_grad():
        expected = option_scores(lm, batch)
        unbounded = attach_trunk_cache(lm)
        option_scores(lm, batch)
        bound = max(v.numel() * v.element_size() for v in unbounded.entries.values()) + 1  # room for one row
        small = attach_trunk_cache(lm, TrunkCache(max_bytes=bound, directory=tmp_path))
        assert_close(option_scores(lm, batch), expected)
        assert 0 < small.bytes <= bound and len(small) == 1
        fresh = attach_trunk_cache(lm, TrunkCache(directory=tmp_path))  # a new process, same disk
        assert_close(option_scores(lm, batch), expected)
        assert fresh.hits == len(batch) and fresh.misses == 0
    detach_trunk_cache(lm)


@pytest.mark.embedded
@pytest.mark.parametrize("packed", [True, False])
def test_trunk_cache_exact_on_smollm2(packed):
    from abmll_pyro.lms import load_smollm2
    from abmll_pyro.train.setup import last_layer_targets

    lm, tok = load_smollm2()
    batch = encode_options(tok, EXAMPLES[:2])
    adapter = BayesLoRA(lm, AdapterConfig(rank=2, lora_alpha=4.0, target_modules=last_layer_targets(lm, None, 4),
                                          init_std=0.01))
    deltas = adapter.sample_deltas(adapter.global_params(), torch.Generator().manual_seed(0))
    with adapter.use(deltas), torch.no_grad():
        reference = full_logits_reference(lm, batch, packed)
        uncached = option_scores(lm, batch, packed=packed)
        attach_trunk_cache(lm)
        cold, warm = option_scores(lm, batch, packed=packed), option_scores(lm, batch, packed=packed)
    detach_trunk_cache(lm)
    adapter.detach()
    assert_close(cold, uncached)  # the cache: 30 blocks split at 26, exact (observed: bit-identical)
    assert_close(warm, uncached)
    # the head at scored rows vs the full [n, L, V] logits: a logsumexp over V = 49,152 entries summed
    # in another order (float32: ~sqrt(V)·eps ≈ 3e-5 relative at worst; observed 1.9e-5 nats)
    finite = reference.isfinite()
    assert torch.allclose(uncached[finite], reference[finite], rtol=1e-6, atol=5e-5)


# ------------------------------------------------------------------ the shared (on-disk) trunk
def _trunk_rows(lm, batch, chunk, directory):
    """Every row's cached trunk entry after scoring ``batch`` in pieces of ``chunk`` examples."""
    cache = attach_trunk_cache(lm, TrunkCache(directory=directory))
    with torch.no_grad():
        for start in range(0, len(batch), chunk):
            option_scores(lm, batch.select(torch.arange(start, min(start + chunk, len(batch)))))
    detach_trunk_cache(lm)
    return cache


@pytest.mark.embedded
def test_shared_trunk_entries_do_not_depend_on_the_batch(tmp_path):
    """With a directory, a row's entry is computed on its own: scoring the same examples in batches of
    2 or all at once stores bit-identical entries (a batched float32 pass does not: SmolLM2's trunk of a
    row differs by up to ~2e-4 between a batch of 2 and of 16 — which run filled a shared cache would
    then change the others' results)."""
    from abmll_pyro.lms import load_smollm2
    from abmll_pyro.train.setup import last_layer_targets

    lm, tok = load_smollm2()
    examples = [Example(f"Review {i}: {'good ' * (i % 5)}movie {'bad ' * (i % 3)}. Sentiment:", ("positive", "negative"),
                        i % 2) for i in range(12)]
    batch = encode_options(tok, examples)
    adapter = BayesLoRA(lm, AdapterConfig(rank=2, lora_alpha=4.0, target_modules=last_layer_targets(lm, None, 4)))
    with adapter.use(adapter.mean_deltas(adapter.global_params())):  # the top 4 blocks live: trunk = 26 blocks
        pieces = _trunk_rows(lm, batch, 2, tmp_path / "a")
        whole = _trunk_rows(lm, batch, len(batch), tmp_path / "b")
        again = _trunk_rows(lm, batch, 5, tmp_path / "a")  # a later run reads them back from disk
    assert pieces.misses == whole.misses == len(batch) and set(pieces.entries) == set(whole.entries)
    assert all(torch.equal(pieces.entries[k], whole.entries[k]) for k in whole.entries)
    assert again.disk_hits == len(batch) and again.misses == 0
    assert all(torch.equal(again.entries[k], whole.entries[k]) for k in whole.entries)


def _fill(directory, queue):
    lm, tok = tiny_model("llama")
    adapter = top_block_adapter("llama", lm)
    batch = encode_options(tok, EXAMPLES * 4)
    with adapter.use(adapter.mean_deltas(adapter.global_params())):
        cache = _trunk_rows(lm, batch, 3, directory)
    queue.put((cache.misses, cache.disk_hits, {k: v.tolist() for k, v in cache.entries.items()}))


def test_shared_trunk_several_processes_at_once(tmp_path):
    """Three processes filling one folder at once: no failure, no partial file, the same entries."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_fill, args=(tmp_path, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    got = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert all(entries == got[0][2] for _, _, entries in got)
    assert not list(tmp_path.rglob("*.tmp"))
    (folder,) = [d for d in tmp_path.iterdir() if d.is_dir()]
    assert f"-t{torch.get_num_threads()}" in folder.name and "torch" in folder.name  # keyed by what changes round-off
    assert len(list(folder.glob("*.pt"))) == len(got[0][2])
    _fill(tmp_path, queue)  # a later process computes nothing
    misses, disk_hits, entries = queue.get(timeout=60)
    assert misses == 0 and disk_hits == len(entries) == len(got[0][2])


def test_shared_trunk_unwritable_folder_warns_and_goes_on(tmp_path):
    lm, tok = tiny_model("qwen2")
    adapter = top_block_adapter("qwen2", lm)
    batch = encode_options(tok, EXAMPLES)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with adapter.use(adapter.mean_deltas(adapter.global_params())), torch.no_grad():
        expected = option_scores(lm, batch)
        attach_trunk_cache(lm, TrunkCache(directory=blocker / "trunk"))
        with pytest.warns(UserWarning, match="cannot write"):
            got = option_scores(lm, batch)
    detach_trunk_cache(lm)
    assert_close(got, expected)


def test_shared_trunk_dir_sets_and_restores_the_environment(tmp_path, monkeypatch):
    import os

    from abmll_pyro.data.trunk import TRUNK_DIR_ENV, shared_trunk_dir

    monkeypatch.setenv(TRUNK_DIR_ENV, "/elsewhere")
    with shared_trunk_dir(tmp_path / "t") as folder:
        assert os.environ[TRUNK_DIR_ENV] == str(folder) == str((tmp_path / "t").resolve())
        with shared_trunk_dir(None):
            assert TRUNK_DIR_ENV not in os.environ
        assert os.environ[TRUNK_DIR_ENV] == str(folder)
    assert os.environ[TRUNK_DIR_ENV] == "/elsewhere"


def test_shared_trunk_stops_writing_before_the_disk_fills(tmp_path, monkeypatch):
    """The disk copy never takes the last MIN_FREE_BYTES (or 5%) of the disk: past it, one warning and
    the run goes on from memory, with the same scores."""
    import shutil

    import abmll_pyro.data.trunk as trunk

    free = shutil.disk_usage(tmp_path).free
    monkeypatch.setattr(trunk, "MIN_FREE_BYTES", free + (1 << 30))  # as if the disk were nearly full
    lm, tok = tiny_model("llama")
    adapter = top_block_adapter("llama", lm)
    batch = encode_options(tok, EXAMPLES)
    with adapter.use(adapter.mean_deltas(adapter.global_params())), torch.no_grad():
        expected = option_scores(lm, batch)
        cache = attach_trunk_cache(lm, TrunkCache(directory=tmp_path / "trunk"))
        with pytest.warns(UserWarning, match="would be left free"):
            got = option_scores(lm, batch)
        again = option_scores(lm, batch)  # from memory, no second warning needed
    detach_trunk_cache(lm)
    assert_close(got, expected)
    assert_close(again, expected)
    assert not list((tmp_path / "trunk").rglob("*.pt")) and cache.hits == len(batch)


def test_shared_trunk_keeps_full_depth_rows_in_memory(tmp_path):
    """With nothing adapted (pretrained, in-context learning) the "trunk" is the whole model and no other
    method could read it: the folder gets nothing, scoring still goes through the memory cache."""
    lm, tok = tiny_model("llama")
    BayesLoRA(lm, AdapterConfig(rank=2, lora_alpha=4.0, target_modules=(TOP["llama"] + "q_proj",)))  # no ΔW active
    batch = encode_options(tok, EXAMPLES)
    with torch.no_grad():
        expected = option_scores(lm, batch)
        cache = attach_trunk_cache(lm, TrunkCache(directory=tmp_path))
        got = option_scores(lm, batch)
    detach_trunk_cache(lm)
    assert_close(got, expected)
    assert cache.misses == len(batch) and not list(tmp_path.rglob("*.pt"))


def test_shared_entry_of_a_view_is_stored_compactly(tmp_path):
    """An entry handed in as a view of a larger tensor is saved as its own rows, not the whole storage
    (the disk copy of a row never drags its batch along), and reads back equal."""
    lm, _ = tiny_model("llama")
    decoder = decoder_of(lm)
    big = torch.randn(64, 32, 16)
    cache = TrunkCache(directory=tmp_path)
    cache.put("row", big[3, :5], decoder)
    cache.put("whole", big[4].clone(), decoder)
    files = {p.stem: p.stat().st_size for p in tmp_path.rglob("*.pt")}
    assert files["row"] < big[3].numel() * big.element_size()  # 5 of 32 positions, not 64 rows
    assert files["whole"] < 2 * big[4].numel() * big.element_size()
    cache.clear()
    assert torch.equal(cache.get("row", decoder), big[3, :5]) and torch.equal(cache.get("whole", decoder), big[4])
