"""Tiny random causal LMs built from configs and synthetic option tasks over raw token ids."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from abmll_pyro.data.scoring import OptionBatch
from abmll_pyro.infer import Episode
from abmll_pyro.models import TaskData

VOCAB = 48


def tiny_lm(kind: str = "llama", seed: int = 0, dtype=torch.float32, vocab: int = VOCAB) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = Qwen2ForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(kind)
    return model.to(dtype).eval()


def toy_option_chars(options) -> list[list[int]]:
    """Each option's length in characters for a batch built from raw token ids: a toy token stands for one
    character. ``OptionLikelihood()``'s default ``char`` reduction (the CLI's) needs these lengths, as a
    batch from ``encode_options`` carries them."""
    return [[len(o) for o in opts] for opts in options]


def random_option_batch(n: int, num_options: int = 3, prompt_len: int = 5, generator=None, vocab: int = VOCAB) -> OptionBatch:
    g = generator or torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, vocab, (prompt_len,), generator=g).tolist() for _ in range(n)]
    options = [[torch.randint(1, vocab, (1 + (j % 2),), generator=g).tolist() for j in range(num_options)] for _ in range(n)]
    gold = torch.randint(0, num_options, (n,), generator=g).tolist()
    return OptionBatch.from_token_ids(prompts, options, gold, option_chars=toy_option_chars(options))


GOOD = list(range(1, 9))  # tokens every task of the synthetic family prefers


def family_batch(n: int, task_seed: int, generator: torch.Generator, num_options: int = 3) -> OptionBatch:
    """One task of a family with shared structure: the gold option is the one token from GOOD.

    Each task has its own prompt distribution (a task-specific marker token) and distractors.
    """
    marker = 20 + task_seed % 20
    prompts, options, gold = [], [], []
    for _ in range(n):
        body = torch.randint(9, VOCAB, (4,), generator=generator).tolist()
        good = GOOD[int(torch.randint(0, len(GOOD), (1,), generator=generator))]
        bad = torch.randint(9, VOCAB, (num_options - 1,), generator=generator).tolist()
        pos = int(torch.randint(0, num_options, (1,), generator=generator))
        opts = bad[:pos] + [good] + bad[pos:]
        prompts.append([marker] + body)
        options.append([[t] for t in opts])
        gold.append(pos)
    return OptionBatch.from_token_ids(prompts, options, gold, option_chars=toy_option_chars(options))


def family_episode(task_seed: int, shots: int, query: int, generator: torch.Generator) -> Episode:
    return Episode(f"task{task_seed}", TaskData(family_batch(shots, task_seed, generator)),
                   TaskData(family_batch(query, task_seed, generator)))


def stepped_adam():
    """A 3-vector parameter and an Adam optimizer that has taken one step (non-empty state to checkpoint)."""
    p = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.Adam([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    return p, opt


def method_predictions(name: str, examples, **settings) -> torch.Tensor:
    """Method ``name`` built on a tiny random Llama (rank-2 LoRA, 1 inner step at lr 1e-2, 2 samples,
    β 1e-3, unless ``settings`` say otherwise), adapted on ``examples[:4]`` and predicting
    ``examples[4:]`` with torch seeded: the option probabilities, detached."""
    from abmll_pyro.config import AdapterConfig
    from abmll_pyro.data.tasks import TaskSplit
    from abmll_pyro.lms import tiny_model
    from abmll_pyro.lora import BayesLoRA
    from abmll_pyro.methods import build_method
    from abmll_pyro.train.config import RunConfig
    from abmll_pyro.train.episodes import EpisodeEncoder

    lm, tok = tiny_model("llama", seed=0)
    adapter = BayesLoRA(lm, AdapterConfig(rank=2, lora_alpha=4.0), generator=torch.Generator().manual_seed(0))
    values = dict(model="tiny-llama", rank=2, lora_alpha=4.0, num_inner_steps=1, inner_lr=1e-2, num_samples=2,
                  kl_beta=1e-3)
    config = RunConfig(**{**values, **settings})
    method = build_method(name, adapter, config, num_train_tasks=2)
    episode = EpisodeEncoder(tok, 128, in_context=method.in_context)(TaskSplit("t", tuple(examples[:4]),
                                                                                 tuple(examples[4:])))
    torch.manual_seed(0)
    with torch.no_grad() if not method.trainable and name != "bayes-lora" else torch.enable_grad():
        return method.predict(method.adapt(episode), episode).detach()


def write_predictions_run(path, method: str, preds) -> None:
    """A run directory holding only ``predictions.jsonl`` for ``preds`` (an eval.compare.Predictions)."""
    import json

    path.mkdir(parents=True)
    with open(path / "predictions.jsonl", "w") as fh:
        for (seed, task, idx), g, p in zip(preds.keys, preds.gold, preds.probs):
            fh.write(json.dumps({"method": method, "seed": seed, "task": task, "index": idx, "gold": int(g),
                                 "probs": p.tolist()}) + "\n")
