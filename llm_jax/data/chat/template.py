"""The chat template: THE one definition of how a dialogue becomes tokens, for training and for inference.

Each turn is its role tag, the content's ordinary tokens, then `<|end|>`:

    [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello!")]
    ids:        <|system|> Be brief. <|end|> <|user|> Hi <|end|> <|assistant|> Hello! <|end|>
    loss_mask:  0          0  0      0       0        0  0       0             1 1    1
(with "Be brief." encoding to 2 tokens and "Hello!" to 2; the spaces only separate tokens, none is added). The tags are the tokenizer's reserved control ids
(tokenizer.SPECIAL_TOKENS), inserted by id: text that spells "<|user|>" encodes as ordinary pieces, so
user content cannot forge a turn. A foreign tokenizer (an imported Hugging Face model) has no such ids: its
tags are then the text "<|user|>\n" (etc.) encoded as ordinary tokens, and a turn ends with EOS (see
chat_tags); everything below holds the same, except that such tags can be typed. No BOS/EOS: a dialogue is delimited by its tags (packing keeps dialogues
apart with segment ids).

Training: render() gives ids and loss_mask, True exactly on assistant content tokens and the assistant's
closing <|end|>, the token that teaches the model to stop. The role tags are never targets: they are
given, not predicted. Next-token shift: the model reads ids[:-1] and predicts ids[1:], so the weight of
target ids[t] is loss_mask[t]: use targets_and_weights(), which returns (inputs, targets, weights) =
(ids[:-1], ids[1:], loss_mask[1:]). loss_mask[0] is always False (ids[0] is a tag), so nothing is lost.

Inference: render_prompt() renders the dialogue so far (ending with a user turn) and appends
`<|assistant|>`; the model writes the answer and the caller stops at `<|end|>` (or EOS). The answer then
joins the dialogue as Message("assistant", text), which re-renders to exactly the tokens seen.
"""
from __future__ import annotations

import weakref

import numpy as np

from llm_jax.data.chat.dialogue import ROLES, Message, dialogue_problem
from llm_jax.data.tokenizer import Tokenizer

TEMPLATES = ("llm_jax", "sep", "chatml")


def render(dialogue: list[Message], tokenizer: Tokenizer,
           max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32[L], loss_mask bool[L]) of a dialogue, cut to its first max_len tokens if given.

    After a cut, `loss_mask.any()` says whether an assistant token survived; an example where it is False
    has nothing to learn and must be dropped (and counted) by the caller, not trained on as zero.
    """
    tags = chat_tags(tokenizer)
    pieces, masks = [], []
    for message, content_ids in zip(dialogue, tokenizer.encode_batch([m.content for m in dialogue])):
        if message.role not in ROLES:
            raise ValueError(f"message role {message.role!r} is not one of {', '.join(ROLES)}")
        tag = tags[message.role]
        turn = [*tag, *content_ids, *tags["end"]]
        pieces.append(turn)
        masks.append([False] * len(tag) + [message.role == "assistant"] * (len(turn) - len(tag)))
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


def render_prompt(dialogue: list[Message], tokenizer: Tokenizer) -> np.ndarray:
    """int32 ids of a dialogue awaiting its answer ([system], user, ..., user), ending with <|assistant|>."""
    problem = dialogue_problem([*dialogue, Message("assistant", "answer")])
    if problem:
        raise ValueError(f"render_prompt needs [system], user, assistant, ..., user turns: {problem}")
    ids, _ = render(dialogue, tokenizer)
    return np.append(ids, np.asarray(chat_tags(tokenizer)["assistant"], np.int32)).astype(np.int32)


def chat_tags(tokenizer: Tokenizer) -> dict[str, tuple[int, ...]]:
    """The ids of each role's tag and of the end of a turn ("end"), by role name.

    A tokenizer trained by llm_jax reserves one control id per tag. One that lacks them (the chat tokens are
    missing, collide, or fall back to unk/eos) gets text tags: "<|user|>\n" encoded as ordinary tokens, and EOS
    as the end of a turn, so that SFT, reward models and chat still work on imported models.
    """
    tags = _TAGS.get(tokenizer)
    if tags is None:
        tags = _TAGS[tokenizer] = _chat_tags(tokenizer)
    return tags


# Tags by tokenizer: encoding text tags costs as much as rendering a short dialogue, which asks for them per row.
_TAGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _chat_tags(tokenizer: Tokenizer) -> dict[str, tuple[int, ...]]:
    special = tokenizer.special_ids  # keyed by the token text, "<|user|>" -> id
    ids = list(special.values())
    if len(set(ids)) == len(ids) and not {tokenizer.unk_id, tokenizer.eos_id} & set(ids):
        return {name[2:-2]: (i,) for name, i in special.items()}
    text = {name[2:-2]: tuple(tokenizer.encode(name + "\n")) for name in special if name != "<|end|>"}
    return {**text, "end": (tokenizer.eos_id,)}


def show(ids: np.ndarray, loss_mask: np.ndarray, tokenizer: Tokenizer) -> str:
    """The rendered text with every trained-on span in ⟦ ⟧, for checking a mask by eye."""
    names = {ids[0]: f"<|{role}|>" for role, ids in chat_tags(tokenizer).items() if len(ids) == 1}
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
