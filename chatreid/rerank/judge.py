"""One best-choice judgement: the query and a group of candidates in, P(choice = k) out.

As in ``chatreid.model.prompting``, one forward over the prompt plus the answer's shared
prefix ("The best match is image") gives the next-token distribution over the index tokens,
renormalised over the group shown.

Two ways to compute the same numbers:

* :class:`PlainJudge` encodes the whole prompt with the processor and runs one full forward
  per group (query and candidate images through the ViT every time);
* :class:`PrefixJudge` prefills the query part of the prompt once per query (KV cache), runs
  every candidate crop through the ViT once per query, and per group runs only the candidate
  list on top of the cache, with its M-RoPE positions continued from the prefix. A group asked
  again after a pick shows the same list up to the slot the pick held, so the cache of its
  previous forward is reused up to there and only the rest of the list is run. With a
  :class:`~chatreid.model.vision_cache.VisionCache`, a candidate whose image key it holds
  (a gallery crop: immutable per object key) skips the ViT altogether, in every query; and
  several groups asked at once (:meth:`BestChoiceJudge.prefetch`) run as one packed forward.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2VLForConditionalGeneration
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling

from chatreid.model import ChatReIDProcessor
from chatreid.model.identity import IdentityVision, memory_pointer
from chatreid.model.prompting import (
    ChoiceTokens,
    answer_distribution,
    answer_logits,
    choice_logits,
    encode_prompt,
    render_prompt,
)
from chatreid.model.vision_cache import Encoded, VisionCache
from chatreid.rerank.prompts import QueryKind, best_choice_prompt, query_head

SPLIT = "\ue000"  # private-use character: marks where the candidate list starts in the template


@dataclass(frozen=True)
class Query:
    """What is searched for: an image, a text/attribute clue, or both (multimodal)."""

    kind: QueryKind
    image: Image.Image | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", QueryKind.parse(self.kind))
        if self.image is not None:  # infrared crops may be single-channel
            object.__setattr__(self, "image", self.image.convert("RGB"))
        if self.kind.has_image and self.image is None:
            raise ValueError(f"query kind {self.kind.value!r} needs a query image")
        if not self.kind.has_image and self.image is not None:
            raise ValueError(f"query kind {self.kind.value!r} takes no query image")
        query_head(self.kind, self.text)  # raises on a missing or malformed clue


@dataclass
class JudgeStats:
    group_forwards: int = 0  # decoder forwards that judged groups (one or several at once)
    groups_judged: int = 0  # groups whose decoder logits were computed
    prefix_forwards: int = 0  # decoder forwards that prefilled the query part
    vision_images: int = 0  # images run through the ViT
    vision_cached: int = 0  # candidate images whose ViT output came from the vision cache
    batched_groups: int = 0  # group judgements that shared a forward with others
    group_tokens: int = 0  # candidate-list tokens the group forwards covered
    reused_tokens: int = 0  # of those, tokens taken from an earlier group forward's cache
    # tokens the decoder computed (every forward, the prefix prefill included): on a CPU a
    # query's time is about these times the per-token cost, plus a fixed cost per forward
    decoder_tokens: int = 0

    @property
    def forwards(self) -> int:
        return self.group_forwards + self.prefix_forwards


def split_rendered(processor: ChatReIDProcessor, head: str, gallery: str) -> tuple[str, str]:
    """The rendered prompt cut where the candidate list starts: (shared part, per-group part)."""
    full = render_prompt(processor, head + gallery)
    marked = render_prompt(processor, head + SPLIT)
    prefix = marked[: marked.index(SPLIT)]
    if not full.startswith(prefix):
        raise ValueError("the chat template does not keep the query part as a prefix")
    return prefix, full[len(prefix) :]


@dataclass
class BestChoiceJudge:
    """What both judges share: the pointer term (with dialogue memory) over the decoder's index
    logits, which are computed once per group shown."""

    model: Qwen2VLForConditionalGeneration
    processor: ChatReIDProcessor
    query: Query
    candidates: Sequence[Image.Image]
    tokens: ChoiceTokens
    stats: JudgeStats = field(default_factory=JudgeStats)
    pointer: np.ndarray | None = None  # identity head's score of each candidate (None: none)
    between: np.ndarray | None = None  # its scores between candidates (dialogue memory)
    memory: float = 0.0  # weight of the earlier picks in the pointer term (0: no memory)
    decoder_weight: float = 1.0  # the decoder logits' weight beside the pointer term
    picks: list[tuple[int, float]] = field(default_factory=list)  # (candidate, turn probability)
    keys: Sequence[str | None] = ()  # each candidate's image key in ``vision`` (None: not cached)
    vision: VisionCache | None = None  # cached ViT outputs of gallery crops (prefix path only)
    # the decoder's index logits per group shown: a group asked again with a new pointer term
    # (the memory changed after a pick) costs no forward
    _logits: dict[tuple[int, ...], np.ndarray] = field(default_factory=dict)

    @property
    def reads_decoder(self) -> bool:
        """Whether the decoder's index logits enter any answer. Not with a pointer term whose
        fitted decoder weight is 0: then every answer is the head's alone and no decoder
        forward (nor ViT pass) runs - the same answers as computing logits and weighing them 0."""
        return self.pointer is None or self.decoder_weight != 0

    @property
    def remembers(self) -> bool:
        """Whether a pick changes later turns' answers to groups it was not in."""
        return self.pointer is not None and self.between is not None and self.memory > 0

    def remember(self, chosen: int, probability: float) -> None:
        """A turn chose ``chosen`` with ``probability``: later turns relate candidates to it."""
        self.picks.append((chosen, probability))

    def pointer_of(self, members: Sequence[int]) -> np.ndarray | None:
        if self.pointer is None:
            return None
        full = memory_pointer(self.pointer, self.between, self.memory, self.picks)
        return full[list(members)]

    def __call__(self, members: Sequence[int]) -> np.ndarray:
        key = tuple(members)
        self.prefetch([key])  # computes nothing where the logits are known or not read
        pointer = self.pointer_of(members)
        logits = self._logits[key] if pointer is None else self.decoder_weight * self._logits[key]
        return answer_distribution(logits, pointer)

    def judged(self, members: Sequence[int]) -> bool:
        """Whether the decoder logits of this group are already computed (asking costs none)."""
        return tuple(members) in self._logits

    def prefetch(self, groups: Sequence[Sequence[int]]) -> None:
        """Compute the decoder logits of several groups now (one packed forward where the
        judge can batch); asking any of them afterwards costs no forward."""
        todo = list(dict.fromkeys(tuple(g) for g in groups if tuple(g) not in self._logits))
        # logits weighed 0 are not computed: zeros give the same answers
        found = (self._many_index_logits(todo) if self.reads_decoder
                 else [np.zeros(len(key)) for key in todo])
        self._logits.update(zip(todo, found, strict=True))

    def _many_index_logits(self, groups: Sequence[Sequence[int]]) -> list[np.ndarray]:
        return [self._index_logits(g) for g in groups]

    def _index_logits(self, members: Sequence[int]) -> np.ndarray:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.model.device

    def answer_ids(self) -> torch.Tensor:
        return torch.tensor([self.tokens.prefix], dtype=torch.long, device=self.device)


class PlainJudge(BestChoiceJudge):
    """The reference: the processor encodes the full prompt; one full forward per group."""

    @torch.no_grad()
    def _index_logits(self, members: Sequence[int]) -> np.ndarray:
        prompt = best_choice_prompt(self.query.kind, len(members), self.query.text)
        images = [self.query.image] if self.query.image is not None else []
        images += [self.candidates[i] for i in members]
        enc = encode_prompt(self.processor, prompt.text, images)
        self.stats.group_forwards += 1
        self.stats.decoder_tokens += enc["input_ids"].shape[1] + len(self.tokens.prefix)
        self.stats.groups_judged += 1
        self.stats.vision_images += len(images)
        return answer_logits(self.model, enc, self.tokens, len(members))


class PrefixJudge(BestChoiceJudge):
    """Query part prefilled once, candidate crops encoded once; per group only the list runs."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._prefix_text, _ = split_rendered(
            self.processor, query_head(self.query.kind, self.query.text), ""
        )
        self._suffixes: dict[int, str] = {}
        self._features: list[torch.Tensor] = []
        self._grids: torch.Tensor | None = None
        self._cache = None
        self._prefix_len = 0
        self._next_pos = 0
        # recent group forwards: (token ids, image of each token or -1, cache after them)
        self._recent: list[tuple[torch.Tensor, torch.Tensor, object]] = []

    @torch.no_grad()
    def prepare(self) -> None:
        """Prefill the query part and encode every candidate crop (once per query)."""
        images = [self.query.image] if self.query.image is not None else None
        # the processor takes flat kwargs that its Unpack[ProcessingKwargs] hint does not list
        enc = self.processor(text=[self._prefix_text], images=images, return_tensors="pt")  # pyright: ignore[reportCallIssue]
        enc = enc.to(self.device)
        grid = enc.get("image_grid_thw")
        positions = self.model.model.get_rope_index(
            enc["input_ids"], enc["mm_token_type_ids"], image_grid_thw=grid
        )[0]
        # the decoder alone: the prefix needs its cache, not logits
        out = self.model.model(**enc, position_ids=positions, use_cache=True)
        self._cache = out.cache
        self._prefix_len = enc["input_ids"].shape[1]
        self.stats.decoder_tokens += self._prefix_len
        # Text after the prefix continues from its largest position, not from its length:
        # an image advances M-RoPE positions by max(h, w), not by its token count.
        self._next_pos = int(positions.max()) + 1
        self.stats.prefix_forwards += 1
        self.stats.vision_images += len(images or ())
        self._encode_candidates()

    def _encode_candidates(self) -> None:
        """Every candidate's ViT output: from the vision cache where it holds the crop's key,
        else one ViT forward over the rest (then cached under their keys)."""
        keys = list(self.keys) or [None] * len(self.candidates)
        found: list[Encoded | None] = [None] * len(keys)
        known = [i for i, k in enumerate(keys) if k is not None]
        if self.vision is not None and known:
            hits = self.vision.lookup_many([keys[i] for i in known])  # pyright: ignore[reportArgumentType]
            for i, entry in zip(known, hits, strict=True):
                found[i] = entry
        missing = [i for i, e in enumerate(found) if e is None]
        if missing:
            pix = self.processor.image_processor(
                images=[self.candidates[i] for i in missing], return_tensors="pt")
            grids = pix["image_grid_thw"].to(self.device)
            # transformers hints the legacy LongTensor (an int64 Tensor is what it takes) and a
            # Tensor pooler_output (Qwen2-VL returns one tensor per image there)
            features = self.model.model.get_image_features(
                pix["pixel_values"].to(self.device), grids  # pyright: ignore[reportArgumentType]
            ).pooler_output  # pyright: ignore[reportAttributeAccessIssue]
            for i, f, g in zip(missing, features, grids, strict=True):  # pyright: ignore[reportArgumentType]
                found[i] = Encoded(f, g)
                if self.vision is not None and keys[i] is not None:
                    self.vision.store(keys[i], found[i])  # pyright: ignore[reportArgumentType]
        encoded = [e for e in found if e is not None]
        self._features = [e.features for e in encoded]
        self._grids = torch.stack([e.grid for e in encoded])
        self.stats.vision_images += len(missing)
        self.stats.vision_cached += len(self.candidates) - len(missing)

    def _suffix_text(self, n: int) -> str:
        if n not in self._suffixes:
            prompt = best_choice_prompt(self.query.kind, n, self.query.text)
            self._suffixes[n] = split_rendered(self.processor, prompt.head, prompt.gallery)[1]
        return self._suffixes[n]

    def _suffix_ids(self, members: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The group's tokens with each image placeholder expanded as the processor does, and
        for each token the candidate whose image it carries (-1 for text)."""
        pad = self.processor.image_token
        parts = self._suffix_text(len(members)).split(pad)
        pieces: list[tuple[str, int]] = [(parts[0], -1)]
        for i, part in zip(members, parts[1:], strict=True):
            pieces += [(pad * self._features[i].shape[0], i), (part, -1)]
        ids, source = [], []
        for text, owner in pieces:
            if text:
                tok = self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
                ids += tok
                source += [owner] * len(tok)
        ids += list(self.tokens.prefix)
        source += [-1] * len(self.tokens.prefix)
        return (torch.tensor([ids], dtype=torch.long, device=self.device),
                torch.tensor(source, dtype=torch.long))

    def _reusable(self, ids: torch.Tensor, source: torch.Tensor) -> tuple[int, object]:
        """(tokens of this group already in a cached forward, that cache) - the longest shared
        start, cut back to an image boundary; (0, the query prefix's cache) when none."""
        best, cache = 0, self._cache
        for old_ids, old_source, old_cache in self._recent:
            n = min(old_ids.shape[1], ids.shape[1]) - 1  # the last token must run: its logits
            same = (old_ids[0, :n] == ids[0, :n]) & (old_source[:n] == source[:n])
            shared = n if bool(same.all()) else int(torch.argmin(same.int()))
            while shared > 0 and source[shared] >= 0 and source[shared - 1] == source[shared]:
                shared -= 1  # never split one image's tokens
            if shared > best:
                best, cache = shared, old_cache
        return best, cache

    def _plan(self, members: Sequence[int]) -> _Row:
        """What one group's forward runs: its tokens past the longest reusable cache."""
        if self._cache is None:
            self.prepare()
        ids, source = self._suffix_ids(members)
        mm_types = (ids == self.processor.image_token_id).int()
        assert self._grids is not None  # prepare() encoded the candidates
        grids = self._grids[list(members)]
        # LongTensor hints, as above
        positions = self.model.model.get_rope_index(ids, mm_types, image_grid_thw=grids)[0]  # pyright: ignore[reportArgumentType]
        shared, base = self._reusable(ids, source)
        tail = [i for i in dict.fromkeys(source[shared:].tolist()) if i >= 0]
        return _Row(len(members), ids, source, positions + self._next_pos, shared, base, tail)

    @torch.no_grad()
    def _index_logits(self, members: Sequence[int]) -> np.ndarray:
        return self._many_index_logits([members])[0]

    @torch.no_grad()
    def _many_index_logits(self, groups: Sequence[Sequence[int]]) -> list[np.ndarray]:
        rows = [self._plan(members) for members in groups]
        batchable = len(rows) > 1 and all(_dynamic(r.base) for r in rows)
        done = self._run_batch(rows) if batchable else [self._run_one(r) for r in rows]
        out = []
        for row, (hidden, cache) in zip(rows, done, strict=True):
            self._recent = [(row.ids, row.source, cache), *self._recent][:_RECENT]
            self.stats.reused_tokens += row.shared
            self.stats.group_tokens += row.ids.shape[1]
            self.stats.decoder_tokens += row.ids.shape[1] - row.shared
            out.append(choice_logits(self.model, hidden, self.tokens.index_ids[: row.n]))
        self.stats.group_forwards += len(rows) if not batchable else 1
        self.stats.groups_judged += len(rows)
        self.stats.batched_groups += len(rows) if batchable else 0
        return out

    def _images(self, rows: Sequence[_Row]) -> dict | None:
        # one tensor per image, as get_image_features returns them, in token order
        feats = tuple(self._features[i] for r in rows for i in r.tail)
        return {"image": BaseModelOutputWithPooling(pooler_output=feats)} if feats else None  # pyright: ignore[reportArgumentType]

    def _run_one(self, row: _Row) -> tuple[torch.Tensor, object]:
        mask = torch.ones(1, self._prefix_len + row.ids.shape[1], dtype=torch.long,
                          device=self.device)
        out = self.model.model(  # the decoder alone: choice_logits reads the LM head's rows
            input_ids=row.ids[:, row.shared:],
            attention_mask=mask,  # must cover prefix + suffix
            position_ids=row.positions[..., row.shared:],
            cache=_fork(row.base, self._prefix_len + row.shared),
            use_cache=True,
            mm_encoder_outputs=self._images([row]),
        )
        return out.last_hidden_state[0, -1], out.cache

    def _run_batch(self, rows: Sequence[_Row]) -> list[tuple[torch.Tensor, object]]:
        """Several groups in one forward, packed into one sequence (no padding to compute):
        the rows' reused caches side by side, then their new tokens side by side; a
        block mask lets each row see only its own cache and, causally, its own tokens, and
        the explicit M-RoPE positions keep each row's own numbering."""
        cached = [self._prefix_len + r.shared for r in rows]
        fresh = [r.ids.shape[1] - r.shared for r in rows]
        c_all, n_all = sum(cached), sum(fresh)
        c_at = [sum(cached[:i]) for i in range(len(rows))]  # each row's cache segment start
        n_at = [sum(fresh[:i]) for i in range(len(rows))]  # ... and its new tokens' start
        mask = torch.zeros(n_all, c_all + n_all, dtype=torch.bool, device=self.device)
        causal = torch.ones(max(fresh), max(fresh), dtype=torch.bool, device=self.device).tril()
        for c0, n0, c, n in zip(c_at, n_at, cached, fresh, strict=True):
            mask[n0: n0 + n, c0: c0 + c] = True
            mask[n0: n0 + n, c_all + n0: c_all + n0 + n] = causal[:n, :n]
        ids = torch.cat([r.ids[:, r.shared:] for r in rows], dim=1)
        positions = torch.cat([r.positions[..., r.shared:] for r in rows], dim=2)
        last = torch.tensor([n0 + n - 1 for n0, n in zip(n_at, fresh, strict=True)],
                            device=self.device)
        out = self.model.model(
            input_ids=ids,
            attention_mask={"full_attention": mask[None, None]},  # taken as is, not rebuilt
            position_ids=positions,
            cache=_pack([r.base for r in rows], cached),
            use_cache=True,
            mm_encoder_outputs=self._images(rows),
        )
        hidden = out.last_hidden_state[0, last]
        return [(hidden[b], _unpack(out.cache, c0, c, c_all + n0, n))
                for b, (c0, n0, c, n) in enumerate(zip(c_at, n_at, cached, fresh, strict=True))]


@dataclass
class _Row:
    """One group's forward: its tokens, what they show, and the cache it continues."""

    n: int  # candidates shown
    ids: torch.Tensor  # (1, T) the whole candidate list
    source: torch.Tensor  # (T,) candidate whose image each token carries, -1 for text
    positions: torch.Tensor  # (3, 1, T) M-RoPE positions, continued from the query prefix
    shared: int  # leading tokens already in ``base``
    base: object  # the cache continued (the query prefix's, or an earlier group's)
    tail: list[int]  # candidates whose image tokens run (those past ``shared``)


_RECENT = 16  # cached group forwards kept per query: a bracket's every leaf and its root


def _dynamic(cache) -> bool:
    return all(type(layer) is DynamicLayer for layer in cache.layers)


def _pack(caches: Sequence, lengths: Sequence[int]):
    """One cache holding each of ``caches`` (cut at its length) one after another."""
    packed = copy.copy(caches[0])
    packed.layers = []
    for i, layer in enumerate(caches[0].layers):
        new = copy.copy(layer)
        if layer.is_initialized:
            new.keys = torch.cat([c.layers[i].keys[..., :n, :]
                                  for c, n in zip(caches, lengths, strict=True)], dim=-2)
            new.values = torch.cat([c.layers[i].values[..., :n, :]
                                    for c, n in zip(caches, lengths, strict=True)], dim=-2)
        packed.layers.append(new)
    return packed


def _unpack(cache, start: int, length: int, new_start: int, new_length: int):
    """One row of a packed cache: its cached segment, then its new tokens (a copy)."""
    single = copy.copy(cache)
    single.layers = []
    for layer in cache.layers:
        new = copy.copy(layer)
        if layer.is_initialized:
            new.keys = _cut(layer.keys, start, length, new_start, new_length)
            new.values = _cut(layer.values, start, length, new_start, new_length)
        single.layers.append(new)
    return single


def _cut(t: torch.Tensor, start: int, length: int, new_start: int, new_length: int
         ) -> torch.Tensor:
    return torch.cat([t[..., start: start + length, :],
                      t[..., new_start: new_start + new_length, :]], dim=-2)


def _fork(cache, length: int):
    """A cache holding the first ``length`` tokens of ``cache``, sharing its tensors: a forward
    replaces a layer's tensors (concatenation) rather than writing into them, so views are
    safe and nothing is copied."""
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        forked = copy.deepcopy(cache)
        forked.crop(length)
        return forked
    forked = copy.copy(cache)
    forked.layers = []
    for layer in cache.layers:
        new = copy.copy(layer)
        if layer.is_initialized:
            new.keys = layer.keys[..., :length, :]
            new.values = layer.values[..., :length, :]
        forked.layers.append(new)
    return forked



def make_judge(
    model: Qwen2VLForConditionalGeneration,
    processor: ChatReIDProcessor,
    query: Query,
    candidates: Sequence[Image.Image],
    tokens: ChoiceTokens,
    reuse_prefix: bool,
    identity: IdentityVision | None = None,
    *,
    keys: Sequence[str | None] = (),
    vision: VisionCache | None = None,
) -> PlainJudge | PrefixJudge:
    """The judge for one query; with an identity head (an image query of a kind it scores, or
    a clue of a kind it has a clue weight for) every turn's answer distribution gets the head's
    pointer term, and with the kind's memory on, that term also relates candidates to the
    dialogue's earlier picks. ``keys``/``vision``: the candidates' image keys and the vision
    cache they are looked up in (the prefix path only; the plain path is the reference)."""
    if not reuse_prefix:
        keys, vision = (), None
    cls = PrefixJudge if reuse_prefix else PlainJudge
    kind = query.kind.value
    terms = None if identity is None else identity.pointer_terms(kind, query.image, query.text,
                                                                 candidates)
    if identity is None or terms is None:
        return cls(model, processor, query, candidates, tokens, keys=keys, vision=vision)
    pointer, between = terms
    return cls(model, processor, query, candidates, tokens, pointer=pointer, between=between,
               memory=identity.memory_of(kind), decoder_weight=identity.decoder_weight,
               keys=keys, vision=vision)
