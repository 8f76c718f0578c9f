"""Expected chat-template renderings, written by transformers' apply_chat_template.

Reads tests/fixtures/chat_templates/<family>.jinja (the families' published templates, verbatim)
and sources.json (each family's special tokens), renders every case below with
`PreTrainedTokenizerFast.apply_chat_template(tokenize=False)` and writes expected.json:
{family: {case: {"text": str} or {"error": str}}} (the message a template's raise_exception
gave). tests/entrypoints/test_chat_templates.py renders the same cases through the server's
chat path and compares. Needs transformers (the torch venv of make_reference_fixtures.py):

    /work/venv-ref/bin/python scripts/make_chat_template_fixtures.py
"""

import argparse
import json
from pathlib import Path

FOLDER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "chat_templates"

USER = {"role": "user", "content": "What is 2+2?"}
SYSTEM = {"role": "system", "content": "You answer in one word."}
# Whitespace around the answer: Gemma's templates trim it, the others keep it.
ANSWER = {"role": "assistant", "content": "  Four.  "}
AGAIN = {"role": "user", "content": "And 3+3?"}

# name: (messages, add_generation_prompt, extra template variables)
CASES = {
    "user": ([USER], True, {}),
    "system_user": ([SYSTEM, USER], True, {}),
    "multi_turn": ([SYSTEM, USER, ANSWER, AGAIN], True, {}),
    "multi_turn_no_generation_prompt": ([USER, ANSWER, AGAIN], False, {}),
    "user_after_user": ([USER, AGAIN], True, {}),
    "no_thinking": ([USER, ANSWER, AGAIN], True, {"enable_thinking": False}),
    # The reasoning of the answer to the last question, under its older name "thinking".
    "reasoning": ([USER, {**ANSWER, "thinking": "2 and 2 make 4."}], False, {}),
}


def tokenizer_for(special: dict):
    """A one-word tokenizer carrying the family's special-token strings (the template only
    reads those strings; the vocabulary is irrelevant with tokenize=False)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    strings = [s for s in special.values() if s is not None]
    vocab = {s: i for i, s in enumerate(dict.fromkeys(["[x]", *strings]))}
    tok = Tokenizer(WordLevel(vocab, unk_token="[x]"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def render(tok, template: str, case) -> dict:
    from jinja2.exceptions import TemplateError

    messages, add_generation_prompt, extra = case
    try:
        text = tok.apply_chat_template(messages, chat_template=template, tokenize=False,
                                       add_generation_prompt=add_generation_prompt, **extra)
    except TemplateError as exc:
        return {"error": str(exc)}
    return {"text": text}


def main() -> None:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", type=Path, default=FOLDER)
    folder = parser.parse_args().folder
    sources = json.loads((folder / "sources.json").read_text())
    expected = {"transformers": transformers.__version__, "cases": {
        name: {"messages": m, "add_generation_prompt": g, "chat_template_kwargs": e}
        for name, (m, g, e) in CASES.items()}}
    for family, source in sources["families"].items():
        template = (folder / f"{family}.jinja").read_text()
        tok = tokenizer_for(source["special_tokens"])
        expected[family] = {name: render(tok, template, case) for name, case in CASES.items()}
    (folder / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False)
                                          + "\n")


if __name__ == "__main__":
    main()
