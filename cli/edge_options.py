"""The edge's command-line options, declared once: each option, its help, and the ``EdgeConfig``
field it sets.

``edgecloud edge`` and ``edgecloud demo`` (and any command that runs generations on the device)
take their options from ``EDGE_OPTIONS`` through ``with_edge_options``, which adds them to the
command's signature and hands the command one ``EdgeConfig``. A new edge option is one ``Opt``
here and one ``EdgeConfig`` field; the demo forwards it to its edge process by itself
(``edge_args``).
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.common import (
    MiniAdapterOpt,
    MiniDraftOpt,
    MiniFixedOpt,
    MiniModeOpt,
    MiniOpt,
    MiniPipelineOpt,
    MiniThresholdOpt,
)
from edge_worker.config import (
    DEFAULT_ENERGY_WEIGHT,
    DEFAULT_LATENCY_WEIGHT,
    DEFAULT_MEMORY_WEIGHT,
    DEFAULT_TOKENS,
    EdgeConfig,
    default_broker,
    default_keys_dir,
)


def _same(value: Any) -> Any:
    return value


def _negated(value: bool) -> bool:
    return not value


@dataclass(frozen=True)
class Opt:
    """One option: ``name`` is the Python parameter; ``field`` the EdgeConfig field it sets
    (through ``convert``); ``flags`` how it is spelt on a command line, for forwarding: one flag
    for a value or a switch that turns something on, two (on, off) for a ``--x/--no-x`` pair."""

    name: str
    annotation: Any
    default: Any
    field: str
    convert: Callable[[Any], Any] = _same
    flags: tuple[str, ...] = ()

    def args(self, value: Any) -> list[str]:
        """The command-line words that give ``value`` (none for the default)."""
        if value == self.default:
            return []
        if isinstance(self.default, bool):
            return [self.flags[0] if value else self.flags[1]] if len(self.flags) == 2 else [self.flags[0]]
        if isinstance(value, list | tuple):  # a repeatable option
            return [word for v in value for word in (self.flags[0], str(v))]
        return [self.flags[0], str(value)]


def _opt(name: str, typ: Any, default: Any, field: str, help: str, *flags: str,
         convert: Callable[[Any], Any] = _same) -> Opt:
    long = [f for f in flags if f.startswith("--")] or ["--" + name.replace("_", "-")]
    short = [f for f in flags if not f.startswith("--")]
    decl = "/".join(long) if isinstance(default, bool) and len(long) == 2 else long[0]
    return Opt(name, Annotated[typ, typer.Option(decl, *short, help=help)], default, field, convert, tuple(long))


EDGE_OPTIONS: tuple[Opt, ...] = (
    _opt("tokens", int, DEFAULT_TOKENS, "max_new_tokens", "Maximum number of tokens to generate.",
         "--tokens", "-n"),
    _opt("model", str, "smollm2-135m", "model", "smollm2-135m (default), tiny-llama, tiny-gpt2, a .gguf file, "
         "a model directory or a hub id.", "--model", "-m"),
    _opt("split", int | None, None, "split", "Layers to run on the edge (0..N); without it the cost model "
         "chooses.", "--split", "-k"),
    _opt("min_split", int, 0, "min_split", "Privacy floor: never fewer layers on the edge (see the leakage "
         "table in BENCHMARKS.md)."),
    _opt("max_leakage", float | None, None, "max_leakage", "Privacy budget: no split whose measured token "
         "recovery exceeds this fraction."),
    _opt("energy_weight", float, DEFAULT_ENERGY_WEIGHT, "energy_weight", "Cost-model weight of device energy."),
    _opt("latency_weight", float, DEFAULT_LATENCY_WEIGHT, "latency_weight", "Cost-model weight of latency."),
    _opt("memory_weight", float, DEFAULT_MEMORY_WEIGHT, "memory_weight", "Cost-model weight of device memory."),
    _opt("force_local", bool, False, "force_local", "Run every layer here; no broker."),
    _opt("force_cloud", bool, False, "force_cloud", "Only the embedding here (split 0)."),
    _opt("broker", str | None, None, "broker", "Broker address (env EDGECLOUD_BROKER).",
         convert=lambda v: v or default_broker()),
    _opt("keys", Path | None, None, "keys_dir", "Keys directory (env EDGECLOUD_KEYS).",
         convert=lambda v: v or default_keys_dir()),
    _opt("api_key", str | None, None, "api_key", "API key for the broker (env EDGECLOUD_API_KEY).",
         convert=lambda v: v or os.environ.get("EDGECLOUD_API_KEY")),
    _opt("no_encryption", bool, False, "encryption", "Send activations in the clear.", convert=_negated),
    _opt("no_curve", bool, False, "curve", "Connect to the broker without CURVE (on when the keys directory "
         "holds client-default.key).", convert=_negated),
    _opt("wire_dtype", str, "fp16", "wire_dtype", "Activation precision on the wire: fp32, fp16, bf16, int8 "
         "(with fp16 outlier channels)."),
    _opt("reduce_dims", int | None, None, "reduce_dims", "Project the activations to this many dims before "
         "they leave (calibrated per model and split, see `edgecloud calibrate`)."),
    _opt("reductions", Path | None, None, "reductions_dir", "Projection files for --reduce-dims "
         "(env EDGECLOUD_REDUCTIONS, default ~/.cache/edgecloud/reductions)."),
    _opt("temperature", float, 0.0, "temperature", "0 is greedy; above 0 samples."),
    _opt("top_p", float, 1.0, "top_p", "Nucleus sampling mass."),
    _opt("seed", int, 0, "seed", "Seed for sampling: the same seed gives the same text."),
    _opt("top_k", int, 0, "top_k", "Sample among the k most likely tokens only (0: every token)."),
    _opt("min_p", float, 0.0, "min_p", "Drop tokens less likely than this fraction of the top token "
         "(0: keep every token)."),
    _opt("repetition_penalty", float, 1.0, "repetition_penalty", "Above 1, generated tokens become less likely "
         "to come again (the prompt's are not penalised: their ids never leave the device); 1 is off."),
    _opt("stop", list[str] | None, None, "stop", "End the text before this string (repeat for several).",
         convert=lambda v: tuple(v or ())),
    _opt("raw_prompt", bool, False, "raw_prompt", "Do not apply the chat template."),
    _opt("truncate_prompt", bool, False, "truncate_prompt", "A prompt too long for the model's context with "
         "--tokens after it loses its oldest tokens instead of being refused."),
    _opt("timeout", float, 30.0, "request_timeout_s", "Seconds one cloud request may take before a retry."),
    _opt("max_frame_mb", float, 8.0, "max_frame_mb", "Largest frame sent to the cloud, MiB: a longer prompt "
         "goes in several (the broker takes up to its --max-request-mb, 32 by default)."),
    _opt("prefix_cache_mb", float, 64.0, "prefix_cache_mb", "MiB of prompts' and generations' keys and values "
         "of the edge's layers kept for generations that start the same way (a system prompt, a conversation's "
         "earlier turns and answers); 0: none."),
    _opt("deadline", float, 60.0, "step_deadline_s", "Seconds one step may take, retries and failovers "
         "included, before giving up (or falling back)."),
    _opt("no_replan", bool, False, "dynamic", "Keep the planned split for the whole generation, even when "
         "the link or the device changes.", convert=_negated),
    _opt("adaptive_timeout", bool, True, "adaptive_timeout", "Resend an unanswered decode step after about "
         "one measured round trip (default), or only after --timeout.", "--adaptive-timeout", "--fixed-timeout"),
    _opt("no_fallback", bool, False, "fallback_local", "Fail instead of running the rest of the model here "
         "when the cloud is gone.", convert=_negated),
    _opt("device", str, "cpu", "device", "Where this device's own layers compute: cpu, cuda, or auto (a GPU "
         "when torch sees one)."),
    _opt("dtype", str, "auto", "dtype", "What this device's own layers compute in: auto (a model object's own "
         "dtype, else float32 on a CPU and bfloat16 on a GPU), float32, bfloat16 or float16."),
    _opt("cuda_graphs", bool, False, "cuda_graphs", "On a GPU, run decode steps as CUDA graphs captured "
         "between the attentions: the same tokens, fewer kernel launches (needs --device cuda or auto)."),
    _opt("cloud_latency", float, 0.0, "cloud_latency_s", "Emulated extra round trip to the cloud, seconds."),
    _opt("bandwidth_mbps", float | None, None, "bandwidth_mbps", "Emulated link bandwidth, Mbit/s."),
    Opt("mini", MiniOpt, "auto", "mini", flags=("--mini",)),
    Opt("mini_threshold", MiniThresholdOpt, None, "mini_threshold", flags=("--mini-threshold",)),
    Opt("mini_mode", MiniModeOpt, "verify", "mini_mode", flags=("--mini-mode",)),
    Opt("mini_max_draft", MiniDraftOpt, 8, "mini_max_draft", flags=("--mini-max-draft",)),
    Opt("mini_fixed", MiniFixedOpt, False, "mini_adaptive", _negated, flags=("--mini-fixed",)),
    Opt("mini_pipeline", MiniPipelineOpt, True, "mini_pipeline", flags=("--mini-pipeline", "--no-mini-pipeline")),
    Opt("mini_adapter", MiniAdapterOpt, None, "mini_adapter", flags=("--mini-adapter",)),
    _opt("mini_group", int, 8, "mini_group", "Pipelined drafting: at most N guesses per frame (those made while "
         "the oldest answer is out go together, the worker verifying them in one pass); 1: a frame per guess. "
         "Greedy only: with sampling each frame carries one guess."),
    _opt("mini_tree", int, 0, "mini_tree", "Verify mode: draft a token tree of up to N nodes per round trip (the "
         "chain of best guesses and, beside each, the drafter's next likeliest tokens) instead of pipelining a "
         "chain; 0 (default): chains. For drafters often right at their second choice (self, a weak copy)."),
)


def settings_from(values: dict[str, Any]) -> EdgeConfig:
    """The EdgeConfig that option values (by parameter name) describe; absent ones keep their default."""
    fields = {o.field: o.convert(values.get(o.name, o.default)) for o in EDGE_OPTIONS}
    return EdgeConfig(**fields)


def edge_args(values: dict[str, Any], skip: frozenset[str] = frozenset()) -> list[str]:
    """``edgecloud edge`` arguments that reproduce option values (every option not at its default)."""
    args: list[str] = []
    for o in EDGE_OPTIONS:
        if o.name in values and o.name not in skip:
            args += o.args(values[o.name])
    return args


def with_edge_options(*, leave_out: frozenset[str] = frozenset(), defaults: dict[str, Any] | None = None):
    """Give a command every edge option (but ``leave_out``, with ``defaults`` changed): the
    command is called with its own parameters plus ``settings`` (the EdgeConfig) and
    ``edge_values`` (the raw option values, for forwarding)."""
    defaults = defaults or {}

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values()
               if p.name not in ("settings", "edge_values")]
        options = [o for o in EDGE_OPTIONS if o.name not in leave_out]
        params = own + [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, annotation=o.annotation,
                                          default=defaults.get(o.name, o.default)) for o in options]
        names = {o.name for o in options}

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            values = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            return command(**kwargs, settings=lambda: settings_from(values), edge_values=values)

        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate
