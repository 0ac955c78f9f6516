"""Chat templates: THE definition of how a dialogue becomes tokens, for training and for inference, chosen by
name (data.chat_template; an export records the one its model was trained with):

    llm_jax (default)  <|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>Hello!<|end|>
    sep                [CLS]Hi[SEP]Hello![SEP]How are you?[SEP]...   (the classic Chinese dialogue GPT-2)
    chatml             <|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\nHello!<|im_end|>\\n   (Qwen)

A template is a function tokenizer -> Tags: the ids once before the first turn (`begin`: sep's [CLS]), the ids
before each role's content (`open`), the one token that closes every turn (`end`), and ids after it (`after`:
ChatML's newline). To add a template, write such a function and name it in TEMPLATES; everything below
(training masks, prompts, stop tokens, the preference and RL renderings) follows from its Tags.

The tags are the tokenizer's special tokens, inserted by id: content that spells "<|user|>", "[SEP]" or
"<|im_end|>" encodes as ordinary pieces (tokenizer.encode never parses specials), so it cannot forge a turn.
llm_jax's tags on a tokenizer without its reserved chat tokens (an imported model's) are the text "<|user|>\\n"
(etc.) encoded as ordinary tokens, and a turn ends with EOS. sep needs [CLS] and [SEP], chatml needs
<|im_start|> and <|im_end|>: a tokenizer without them is a ConfigError. sep has no roles: a system message is
one more segment before the first user turn.

Training: render() gives ids and loss_mask, True exactly on assistant content tokens and the `end` that closes
an assistant turn, the token that teaches the model to stop; tags are given, never targets. Next-token shift:
the model reads ids[:-1] and predicts ids[1:], so the weight of target ids[t] is loss_mask[t]: use
targets_and_weights(). loss_mask[0] is always False (ids[0] is a tag or the system text), so nothing is lost.

Inference: render_prompt() renders the dialogue so far (ending with a user turn) and appends the assistant's
`open`; the model writes the answer and the caller stops at `end` (or EOS). The answer then joins the dialogue
as Message("assistant", text), which re-renders to exactly the tokens seen.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np

from llm_jax.data.chat.dialogue import ROLES, Message, dialogue_problem
from llm_jax.data.pieces import SPECIAL_TOKENS, PieceTable
from llm_jax.errors import ConfigError

DEFAULT = "llm_jax"


@dataclass(frozen=True)
class Tags:
    open: dict[str, tuple[int, ...]]  # by role: the ids before the content
    end: int  # closes every turn: trained on after an answer, the token generation stops at
    begin: tuple[int, ...] = ()  # once, before the first turn
    after: tuple[int, ...] = ()  # after `end`, never trained on
    note: str = ""  # said once where data is prepared: how the template falls back on this tokenizer


def _llm_jax(tok: PieceTable) -> Tags:
    ids = [tok.specials.get(name) for name in SPECIAL_TOKENS]
    if None not in ids and len(set(ids)) == len(ids) and not {tok.unk_id, tok.eos_id} & set(ids):
        return Tags(open={name[2:-2]: (i,) for name, i in zip(SPECIAL_TOKENS, ids) if name != "<|end|>"}, end=ids[-1])
    return Tags(open={role: tuple(tok.encode(f"<|{role}|>\n")) for role in ROLES}, end=tok.eos_id,
                note="the tokenizer has no chat tokens of its own: role tags are written as text (<|user|> ...) "
                     "and a turn ends with EOS")


def _sep(tok: PieceTable) -> Tags:
    cls, sep = _needed(tok, "sep", "[CLS]", "[SEP]")
    return Tags(open={role: () for role in ROLES}, end=sep, begin=(cls,))


def _chatml(tok: PieceTable) -> Tags:
    start, end = _needed(tok, "chatml", "<|im_start|>", "<|im_end|>")
    return Tags(open={role: (start, *tok.encode(f"{role}\n")) for role in ROLES}, end=end,
                after=tuple(tok.encode("\n")))


TEMPLATES: dict[str, Callable[[PieceTable], Tags]] = {"llm_jax": _llm_jax, "sep": _sep, "chatml": _chatml}


def _needed(tok: PieceTable, template: str, *names: str) -> list[int]:
    missing = [name for name in names if name not in tok.specials]
    if missing:
        raise ConfigError(f"data.chat_template={template} needs the special tokens {' and '.join(names)}, which this "
                          f"tokenizer lacks ({', '.join(missing)}); its specials: {', '.join(tok.specials) or 'none'}")
    return [tok.specials[name] for name in names]


def suggested(tokenizer: PieceTable) -> str:
    """The template a tokenizer's own special tokens are for: the first of TEMPLATES other than the default that
    it can render (sep for [CLS]/[SEP], a BERT vocabulary; chatml for <|im_start|>/<|im_end|>, Qwen's), else the
    default."""
    for name in TEMPLATES:
        try:
            if name != DEFAULT and tags(tokenizer, name):
                return name
        except ConfigError:
            continue
    return DEFAULT


def tags(tokenizer: PieceTable, template: str = "") -> Tags:
    """The Tags of `template` (empty: the default) on `tokenizer`."""
    by_name = _TAGS.setdefault(tokenizer, {})
    name = template or DEFAULT
    if name not in by_name:
        if name not in TEMPLATES:
            raise ConfigError(f"data.chat_template={name!r} is not one of {', '.join(TEMPLATES)}")
        by_name[name] = TEMPLATES[name](tokenizer)
    return by_name[name]


# Tags by tokenizer: encoding text tags costs as much as rendering a short dialogue, which asks for them per row.
_TAGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def render(dialogue: list[Message], tokenizer: PieceTable, max_len: int | None = None,
           template: str = "") -> tuple[np.ndarray, np.ndarray]:
    """(ids int32[L], loss_mask bool[L]) of a dialogue, cut to its first max_len tokens if given.

    After a cut, `loss_mask.any()` says whether an assistant token survived; an example where it is False
    has nothing to learn and must be dropped (and counted) by the caller, not trained on as zero.
    """
    t = tags(tokenizer, template)
    pieces, masks = [list(t.begin)], [[False] * len(t.begin)]
    for message, content_ids in zip(dialogue, tokenizer.encode_batch([m.content for m in dialogue])):
        if message.role not in ROLES:
            raise ValueError(f"message role {message.role!r} is not one of {', '.join(ROLES)}")
        opening = t.open[message.role]
        pieces.append([*opening, *content_ids, t.end, *t.after])
        trained = message.role == "assistant"
        masks.append([False] * len(opening) + [trained] * (len(content_ids) + 1) + [False] * len(t.after))
        if max_len is not None and sum(map(len, pieces)) >= max_len:
            break  # the rest would be cut anyway: don't build it
    ids = np.fromiter((i for p in pieces for i in p), np.int32)
    loss_mask = np.fromiter((b for m in masks for b in m), bool, count=len(ids))
    if max_len is not None:
        ids, loss_mask = ids[:max_len], loss_mask[:max_len]
    return ids, loss_mask


def targets_and_weights(ids: np.ndarray, loss_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, weights) = (ids[:-1], ids[1:], loss_mask[1:]): the weight belongs to the TARGET."""
    return ids[:-1], ids[1:], loss_mask[1:]


def render_prompt(dialogue: list[Message], tokenizer: PieceTable, template: str = "") -> np.ndarray:
    """int32 ids of a dialogue awaiting its answer ([system], user, ..., user), ending with the assistant's tag."""
    problem = dialogue_problem([*dialogue, Message("assistant", "answer")])
    if problem:
        raise ValueError(f"render_prompt needs [system], user, assistant, ..., user turns: {problem}")
    ids, _ = render(dialogue, tokenizer, template=template)
    return np.append(ids, np.asarray(tags(tokenizer, template).open["assistant"], np.int32)).astype(np.int32)


def stop_ids(tokenizer: PieceTable, template: str = "") -> set[int]:
    """The tokens that end an answer: the end of a turn, and EOS."""
    return {tokenizer.eos_id, tags(tokenizer, template).end} - {-1}


def show(ids: np.ndarray, loss_mask: np.ndarray, tokenizer: PieceTable) -> str:
    """The rendered text with every trained-on span in ⟦ ⟧ and special tokens by name, for checking by eye."""
    names = {i: text for text, i in tokenizer.specials.items()}
    out, run, open_span = [], [], False

    def flush():  # bytes are decoded per run, so characters split over byte tokens come out whole
        out.append(tokenizer.decode_bytes(run).decode("utf-8", errors="replace"))
        run.clear()

    for token, trained in zip(ids.tolist(), loss_mask.tolist()):
        if trained != open_span:
            flush()
            out.append("⟦" if trained else "⟧")
            open_span = trained
        if token in names:
            flush()
            out.append(names[token])
        else:
            run.append(token)
    flush()
    return "".join(out) + ("⟧" if open_span else "")
