"""
skills_probe.py — can the default tiny LLM learn the answering steps as text, and how fast? An analysis behind
docs/RESULTS.md (issue 29), not part of the library.

The LLM of the default run (this project's `LLM` and sentencepiece tokenizer; --dim, --n_layers ... as in config.py)
trains from scratch on synthetic/skills.py's texts alone: the question, then 'Reading: <each ECG's reading>.
Answer: <the dataset's answer>', laid out as a chat, the loss on every token, the texts laid end to end in one
stream of which each step takes random windows of --seq tokens (no padding), or with --whole packed whole into rows
of --seq tokens as the run's stage 0 packs them (a window cuts texts longer than itself: with --seq 256 half the
hr_trend texts lose their question, and the series' families learn slower than in the run). Every --eval_every
steps each family is scored on held-out people: the question and the reading are given, the model writes the
answer (greedy), scored as eval.py scores the task. hr_trend is also scored on its changed series alone, "hr_trend
(changed)": two thirds of its texts keep their rate, so its plain score is mostly that prior.

  python -m docs.analysis.skills_probe --steps 600 --batch 16          # a few CPU minutes
  python -m docs.analysis.skills_probe --families single-verify --steps 400   # one family alone
  python -m docs.analysis.skills_probe --families single-verify --form blind     # the question after the reading
  python -m docs.analysis.skills_probe --families new_findings,resolved_findings --form blind --worked
  python -m docs.analysis.skills_probe --families hr_trend --patients 32000 --worked --rates   # the rates' difference
  python -m docs.analysis.skills_probe --families hr_trend --patients 32000 --worked --band    # a band, no subtraction
  python -m docs.analysis.skills_probe --patients 8000 --worked --index_first   # lookups named first: 'ECG3 af: no'
  python -m docs.analysis.skills_probe --patients 3000 --families new_findings,resolved_findings,comparison-query \
      --worked --phrases --whole --steps 900 --eval_every 300 --copy_set   # the compared ECG's findings copied first
  python -m docs.analysis.skills_probe --families hr_trend --patients 64000 --held_people 1500 --balance   # 1/3 each
  python -m docs.analysis.skills_probe --patients 8000 --worked --whole --seq 512 --batch 8   # packed as the run packs
  python -m docs.analysis.skills_probe --families hr_trend --patients 32000 --worked --whole --seq 512 --batch 8 \
      --vocab 400 --check_given   # one family alone, scored with "Check:" given (the step, not where the reading ends)

--form: where the question stands. "written" (the task rows' form): the question, then 'Reading: R. Answer: a'.
"restated": the question, then 'Reading: R. Question: Q. Answer: a' (the answer repeats the question after the
reading, so the answer's position sees the question and the list it is about side by side). "blind": the same answer
after a user turn that does not say the question ("Read, then answer."), so the question's words in the answer can be
predicted only from the reading (half the asked findings are in it): the loss on them rewards looking back at the
list, the mechanism the answer needs. "blind" is scored in its own layout and in the "restated" one (the ECG stages'
layout, where the user asks first).
"""

import argparse
import re
import tempfile
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from chat import ANSWER, FORMATS, SPECIAL_TOKENS, ECGChat, encode_chat
from config import Config
from data import STATEMENTS
from ecg_encoder import ECGEncoder, EncoderConfig
from model import LLM, LLMConfig, Tokenizer, train_tokenizer
from synthetic.skills import SKILL_VAL_PATIENTS, skill_accuracy, skill_rows
from synthetic.tasks import CHECKED


def packed_stream(rows, tok, fmt, rng, whole=0):
    """Every row as a chat, shuffled and concatenated into one token stream (each chat starts with <bos>) -> (N,).
    whole: the chats laid end to end whole, in order, into rows of at most `whole` + 1 tokens, as the run's stage 0
    packed its texts when these probes were run (train.pack now fills fewer, shorter rows, longest text first), the
    rest of a row -100 -> (rows, whole + 1); a chat longer than a row is cut to it."""
    chats = [encode_chat(tok, [("user", rows[i]["question"]), ("assistant", rows[i]["answer"])], fmt=fmt)[0]
             for i in rng.permutation(len(rows))]
    if not whole:
        return torch.tensor([t for ids in chats for t in ids])
    packed = [[]]
    for ids in chats:
        if packed[-1] and len(packed[-1]) + len(ids) > whole + 1:
            packed.append([])
        packed[-1] += ids[:whole + 1]
    out = torch.full((len(packed), whole + 1), -100)
    for k, ids in enumerate(packed):
        out[k, :len(ids)] = torch.tensor(ids)
    return out


def stream_summary(stream, n_texts, args):
    tokens = int((stream >= 0).sum())
    return (f"{tokens} tokens, {tokens / n_texts:.0f} per text; an epoch is "
            f"{n_texts / texts_seen(1, args, stream, n_texts):.0f} steps")


def texts_seen(step, args, stream, n_texts):
    """How many training texts `step` steps of args.batch rows (or windows) of the stream hold."""
    rows = len(stream) if stream.dim() == 2 else len(stream) / args.seq
    return step * args.batch * n_texts / rows


def training_args(ap):
    """The options every text probe trains by (train_step reads them)."""
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16, help="packed rows per step")
    ap.add_argument("--seq", type=int, default=256, help="tokens per packed row")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--eval_every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--whole", action="store_true", help="texts packed whole into rows of --seq tokens, as the run's "
                    "stage 0 packs them, instead of random --seq windows of one stream (which cut a text longer than "
                    "--seq, so its answer is learned without its question: half the hr_trend texts are over 256)")
    ap.add_argument("--doc_mask", action="store_true", help="with --whole: each text attends to itself alone, not to "
                    "the texts before it in its row")


def text_tokenizer(rows, vocab, phrases=False):
    """A sentencepiece tokenizer trained on the rows' questions and answers, with the chat's special tokens."""
    with tempfile.TemporaryDirectory() as d:
        train_tokenizer((t for r in rows for t in (r["question"], r["answer"])), d, vocab, SPECIAL_TOKENS, phrases)
        return Tokenizer(d, SPECIAL_TOKENS)


def text_optimizer(llm, lr):
    """AdamW as the run's stage 0 has it (betas 0.9/0.99, decay 0.01)."""
    return torch.optim.AdamW(llm.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)


def text_chat(tok, dim, layers):
    """The default run's LLM shape at this width and depth (heads of the default's width, 48), from scratch, in an
    ECGChat that has no ECG to read (a one-layer stand-in encoder): a text-only model that prompts and scores as the
    trained one does."""
    cfg = Config()
    ffn = 32 * round(8 * dim / 3 / 32)
    heads = dim // (cfg.dim // cfg.n_heads)
    llm = LLM(LLMConfig(vocab_size=tok.vocab_size, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=layers,
                        num_attention_heads=heads, num_key_value_heads=heads * cfg.n_kv_heads // cfg.n_heads,
                        max_position_embeddings=cfg.max_seq_len, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id))
    return ECGChat(llm, ECGEncoder(EncoderConfig(d_model=32, n_layers=1, n_heads=2)), tok, cfg.max_seq_len, "nanoecg")


def train_step(llm, opt, stream, rng, step, args):
    """One step on args.batch random windows of args.seq tokens of the packed stream (or random rows of a packing
    by whole texts), the loss on every token; lr warmed up over the first 10 % of args.steps, then cosine to a
    tenth. -> the loss"""
    lr = args.lr * min(1.0, step / (0.1 * args.steps)) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / args.steps)))
    for g in opt.param_groups:
        g["lr"] = lr
    if stream.dim() == 2:
        x = stream[torch.from_numpy(rng.integers(0, len(stream), args.batch))]  # (B, seq + 1), -100 past the texts
    else:
        starts = rng.integers(0, len(stream) - args.seq - 1, args.batch)
        x = torch.stack([stream[s:s + args.seq + 1] for s in starts])        # (B, seq + 1)
    ids = x[:, :-1].clamp(min=0)                                             # (B, seq)
    texts = (ids == llm.config.bos_token_id).cumsum(1) if args.doc_mask else None  # (B, seq): each text its own
    logits = llm(ids, document_ids=texts)                                    # (B, seq, V)
    loss = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def with_rates(row, form="rates"):
    """--rates / --band: an hr_trend text answered after the first and last ECG's rates are written with the step
    between them, in place of the two rates alone (tasks.multi_row's check). "rates": their difference, '... Check:
    ECG1 72 bpm, ECG4 95 bpm; 95 - 72 = 23. Answer: increased'. "band": the first rate's band of no change, then
    where the last one falls, so the only arithmetic is a ten added and taken away: '... Check: ECG1 72 bpm, 62-82;
    ECG4 95 bpm, above. Answer: increased' (the rule: a change of 10 bpm or more, so 82 itself is above). Other
    texts are returned as they are."""
    if row["family"] != "hr_trend":
        return row
    head, sep, tail = row["answer"].rpartition(" " + ANSWER)
    head = head.split(" " + CHECKED)[0]   # in place of the rates copied side by side (tasks.multi_row's check)
    rates = [int(x) for x in re.findall(r"(\d+) bpm", head)]
    first, last = rates[0], rates[-1]
    if form == "rates":
        step = f"ECG1 {first} bpm, ECG{len(rates)} {last} bpm; {last} - {first} = {last - first}"
    else:
        where = "above" if last >= first + 10 else "below" if last <= first - 10 else "within"
        step = f"ECG1 {first} bpm, {first - 10}-{first + 10}; ECG{len(rates)} {last} bpm, {where}"
    return dict(row, answer=f"{head} {CHECKED} {step}.{sep}{tail}")


def index_first(row):
    """--index_first: each lookup in an ECG of several written with the ECG's name first, then the finding, then the
    verdict: 'ECG3 atrial flutter: no' for 'atrial flutter not in ECG3'. Written finding-first, the verdict comes
    before the name, so in a walk over up to six ECGs the model must know which ECG's line it is reading before it
    has written which one (first appearance's misses name an ECG one early). Lookups in "the reading" of one ECG
    and "not comparable" tags stay as they are."""
    head, sep, tail = row["answer"].rpartition(" " + CHECKED + " ")
    if not sep:
        return row
    check, dot, rest = tail.partition(". " + ANSWER)
    tags = [re.sub(r"^(.+?) (not in|in) (ECG\d+)$", lambda m: f"{m[3]} {m[1]}: {'no' if m[2] == 'not in' else 'yes'}",
                   tag) for tag in check.split("; ")]
    return dict(row, answer=f"{head}{sep}{'; '.join(tags)}{dot}{rest}")


def copy_set(row):
    """--copy_set: a set comparison's check starts by copying the findings of the ECG it looks them up in, in lower
    case as the lookups name them, so each lookup is a match against a short list just before it instead of a search
    for one ECG's part of a long reading: '... Check: ECG1 has sinus rhythm, right bundle branch block; sinus
    bradycardia not in ECG1; right bundle branch block in ECG1. Answer: ...'. The families whose check compares
    with one ECG's set only (membership_check); other texts are returned as they are."""
    if row["family"] not in ("comparison-query", "new_findings", "resolved_findings"):
        return row
    head, sep, tail = row["answer"].rpartition(" " + CHECKED + " ")
    names = set(re.findall(r"\bin (ECG\d+)\b", tail.partition(ANSWER)[0]))
    if not sep or len(names) != 1:
        return row
    name = names.pop()
    part = re.search(rf"\b{name}: (.*?)\.(?= ECG\d+:|$)", head)
    items = part.group(1).split(", ") if part else []
    rate = next((i for i, x in enumerate(items) if x.endswith(" bpm")), None)
    if rate is None:
        return row
    found = [x.lower() for x in items[rate + 1:] if not x.startswith(("Normal ECG", "Abnormal ECG"))]
    return dict(row, answer=f"{head}{sep}{name} has {', '.join(found) or 'none'}; {tail}")


def balanced(rows, rng):
    """--balance: each family's texts cut to the same number for each of its answers (hr_trend: a third each
    "increased", "decreased", "unchanged", where two thirds of the series keep their rate), so that the commonest
    answer is no longer right most of the time. Families with more than three answers are left as they are."""
    by = defaultdict(list)
    for r in rows:
        by[r["family"]].append(r)
    out = []
    for group in by.values():
        answers = defaultdict(list)
        for r in group:
            answers[r["final"]].append(r)
        if len(answers) > 3:
            out += group
            continue
        n = min(len(a) for a in answers.values())
        out += [a[i] for a in answers.values() for i in rng.permutation(len(a))[:n]]
    return out


def in_form(rows, form):
    """Skill rows (made with after_reading for "restated" and "blind") in one of the --form layouts."""
    return [dict(r, question=r["asked"]) for r in rows] if form == "restated" else rows


def parse_args(argv=None):
    cfg = Config()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=1000, help="simulated people of the training texts")
    ap.add_argument("--questions", type=int, default=16, help="questions per person")
    ap.add_argument("--families", default="", help="comma list: train on these families only (default: all)")
    training_args(ap)
    ap.add_argument("--lower", action="store_true", help="the reading's statements in lower case, as questions and "
                                                         "answers name findings (the same tokens to match)")
    ap.add_argument("--form", choices=("written", "restated", "blind"), default="written",
                    help="where the question stands (see above)")
    ap.add_argument("--worked", action="store_true", help="set comparisons and rhythm changes worked before the "
                                                          "answer ('Check: ...', tasks.worked_check)")
    ap.add_argument("--rates", action="store_true", help="hr_trend answered after the rates' difference is written "
                                                         "(with_rates)")
    ap.add_argument("--band", action="store_true", help="hr_trend answered after the first rate's band of no change "
                                                        "and where the last rate falls are written (with_rates)")
    ap.add_argument("--index_first", action="store_true", help="lookups in one of several ECGs written name first "
                                                               "('ECG3 atrial flutter: no', index_first)")
    ap.add_argument("--copy_set", action="store_true", help="a set comparison's check copies the findings of the ECG "
                                                            "it looks them up in first ('ECG1 has ...; ', copy_set)")
    ap.add_argument("--balance", action="store_true", help="each family's answers equally often in training "
                                                           "(balanced)")
    ap.add_argument("--dim", type=int, default=cfg.dim, help="the LLM's width (heads of 48: dim / 48 of them)")
    ap.add_argument("--layers", type=int, default=cfg.n_layers, help="the LLM's depth")
    ap.add_argument("--held", type=int, default=40, help="held-out texts scored per family")
    ap.add_argument("--held_people", type=int, default=SKILL_VAL_PATIENTS, help="simulated people of the held-out "
                                                                                "texts (the run's by default)")
    ap.add_argument("--phrases", action="store_true", help="a tokenizer whose pieces may span spaces (model."
                    "train_tokenizer(phrases=True)): a finding's name one piece, the texts a third shorter")
    ap.add_argument("--vocab", type=int, default=cfg.vocab_size, help="tokenizer size (one family's texts: 400)")
    ap.add_argument("--check_given", action="store_true", help="held-out texts scored with 'Check:' given after the "
                    "reading: the step alone, without knowing where the reading ends (a family alone learns that late)")
    return ap.parse_args(argv)


def probe_texts(args):
    """The training texts and, by layout, the held-out ones the options ask for -> (rows, {form: held rows})."""
    after = args.form != "written"   # the answer repeats the question after the reading
    rows = skill_rows(args.patients, seed=0, questions=args.questions, after_reading=after, worked=args.worked)
    held = skill_rows(args.held_people, seed=1, after_reading=after, worked=args.worked)
    if args.lower:
        for r in rows + held:
            head, sep, tail = r["answer"].rpartition(ANSWER)
            for s in sorted(STATEMENTS, key=len, reverse=True):
                head = head.replace(s, s.lower())
            r["answer"] = head + sep + tail if sep else r["answer"]
    if args.rates or args.band:
        form = "band" if args.band else "rates"
        rows, held = [with_rates(r, form) for r in rows], [with_rates(r, form) for r in held]
    if args.index_first:
        rows, held = [index_first(r) for r in rows], [index_first(r) for r in held]
    if args.copy_set:
        rows, held = [copy_set(r) for r in rows], [copy_set(r) for r in held]
    if args.balance:
        rows = balanced(rows, np.random.default_rng(args.seed))
    # hr_trend scored on its held-out texts as they come (two thirds "unchanged") and on the changed series apart
    held += [dict(r, family="hr_trend (changed)") for r in held
             if r["family"] == "hr_trend" and r["final"] != "unchanged"]
    if args.families:
        keep = set(args.families.split(","))
        rows = [r for r in rows if r["family"] in keep]
        held = [r for r in held if r["family"] in keep or r["family"].removesuffix(" (changed)") in keep]
    scored = {args.form: in_form(held, args.form)}
    if args.form == "blind":   # does the step transfer to the layout where the user asks first?
        scored["restated"] = in_form(held, "restated")
    return in_form(rows, args.form), scored


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    t0 = time.time()
    rows, scored = probe_texts(args)
    print("a training text:", rows[0]["question"], "|", rows[0]["answer"])
    counts = defaultdict(int)
    for r in rows:
        counts[r["family"]] += 1
    print(f"{len(rows)} training texts in {time.time() - t0:.0f} s:", dict(sorted(counts.items())))
    tok = text_tokenizer(rows, args.vocab, args.phrases)
    stream = packed_stream(rows, tok, FORMATS["nanoecg"], np.random.default_rng(args.seed), args.seq * args.whole)
    print(stream_summary(stream, len(rows), args))
    chat = text_chat(tok, args.dim, args.layers)
    opt = text_optimizer(chat.llm, args.lr)
    rng, t0 = np.random.default_rng(args.seed + 1), time.time()
    for step in range(1, args.steps + 1):
        loss = train_step(chat.llm, opt, stream, rng, step, args)
        if step % args.eval_every == 0 or step == args.steps:
            seen = texts_seen(step, args, stream, len(rows))
            for form, texts in scored.items():
                acc = skill_accuracy(chat, texts, per_family=args.held, check_given=args.check_given)
                print(f"step {step:5d}  loss {loss.item():.3f}  texts seen {seen:7.0f}  {time.time() - t0:5.0f} s  "
                      f"[{form}] " + "  ".join(f"{k} {v:.2f}" for k, v in acc.items()), flush=True)


if __name__ == "__main__":
    main()
