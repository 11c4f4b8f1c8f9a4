"""
generate.py — sampling from the LLM (and, through it, the ECG-chat model).

  left_pad         a batch of prompts of different lengths -> (ids, attention_mask), padded on
                   the left so every prompt's last token sits in the last column
  sample_next      greedy / temperature / top-k / top-p choice of the next token
  generate         prefill once, then decode token by token through the KV cache; stops on
                   EOS or stop strings; streams new text through a callback

A left-padded batch gives exactly the tokens each prompt gives alone: padding is masked out of
attention and RoPE positions are counted over real tokens only (see model.LLM.forward).
"""

import torch


def left_pad(prompts, pad_id):
    """list of token-id lists -> ids (B, T) and attention_mask (B, T), 1 on real tokens."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, p in enumerate(prompts):
        if p:
            ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[b, T - len(p):] = 1
    return ids, mask


def sample_next(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """logits (B, V) -> next token ids (B,). temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]                  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # keep the smallest set of most likely tokens whose probability reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p                          # mass before this token already enough
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(llm, input_ids, attention_mask=None, *, inputs_embeds=None, max_new_tokens=64,
             temperature=0.0, top_k=None, top_p=None, stop_ids=(), stop_strings=(), tokenizer=None,
             on_text=None, generator=None):
    """Continue a (left-padded) batch of prompts. Returns the new tokens of each row, cut before
    the stop token / stop string.

    input_ids (B, T), attention_mask (B, T); inputs_embeds (B, T, C) replaces the embeddings of
    input_ids for the prompt (the ECG-chat model passes prompts with ECG tokens spliced in).
    stop_strings need a tokenizer. on_text(row, text) is called with each piece of new text.
    """
    B, T = input_ids.shape
    device = llm.embed_tokens.weight.device
    input_ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device)
    llm.setup_cache(B, T + max_new_tokens)
    try:
        logits = llm(input_ids if inputs_embeds is None else None, inputs_embeds=inputs_embeds,
                     attention_mask=attention_mask, start_pos=0, last_only=True)[:, -1]   # (B, V)
        new = [[] for _ in range(B)]
        done = [False] * B
        printed = [""] * B  # text already streamed per row
        for step in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)           # (B,)
            for b in range(B):
                if done[b]:
                    continue
                tok = int(nxt[b])
                if tok in stop_ids:
                    done[b] = True
                    continue
                new[b].append(tok)
                if tokenizer is not None and (on_text or stop_strings):
                    text = tokenizer.decode(new[b])
                    hit = [text.index(s) for s in stop_strings if s in text]
                    if hit:
                        done[b] = True
                        text = text[:min(hit)]
                    if on_text and len(text) > len(printed[b]) and not text.endswith("\ufffd"):
                        on_text(b, text[len(printed[b]):])
                        printed[b] = text
            if all(done) or step == max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
            logits = llm(nxt[:, None], attention_mask=attention_mask, start_pos=T + step)[:, -1]
    finally:
        llm.clear_cache()
    if stop_strings and tokenizer is not None:
        new = [_cut_at_stop(row, tokenizer, stop_strings) for row in new]
    return new


def _cut_at_stop(tokens, tokenizer, stop_strings):
    # drop trailing tokens until the decoded text no longer contains a stop string
    while tokens and any(s in tokenizer.decode(tokens) for s in stop_strings):
        tokens = tokens[:-1]
    return tokens
