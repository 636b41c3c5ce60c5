"""qa_from_docs: question-answer pairs grounded in documents (a knowledge base -> instruction data).

Documents: .txt, .md/.markdown (read as they are) and .html/.htm (visible text, through the standard library's
html.parser). Each is cut into chunks (parse.chunks: paragraphs and headings packed up to --max-chars, with
--overlap characters carried over), and for each chunk the teacher writes up to --questions pairs answerable from
the chunk alone. Rules: `unparsed` (no Q/A pair in the reply), `extra_pairs` (pairs beyond --questions in one
reply), `ungrounded` (fewer than --min-grounded of the answer's content words are in the chunk; see
parse.grounded_share), `duplicate_question`. Files of other suffixes and documents without text are listed as
skipped; no document text at all is an error. Every row names its chunk: `source` is
`file:chars A-B` (0-based, end exclusive, in the document's text: the HTML's visible text for .html) and
`chunk` holds the text itself.
"""

from __future__ import annotations

from pathlib import Path

from tuneforge.data import readers
from tuneforge.data.curate.synth import chat_row, user
from tuneforge.data.curate.synth.parse import chunks, grounded_share, html_text, parse_qa
from tuneforge.errors import DataError

DOC_SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm")
ASK = ("Read the text below and write {n} question-answer pairs that a reader could ask about it. Each answer must "
       "be found in the text alone; quote its words where you can. Use this format:\nQ: <question>\nA: <answer>\n\n"
       "Text:\n\"\"\"\n{chunk}\n\"\"\"")


def document_text(path: Path) -> str:
    text = readers.read_text(path)  # the data path's decoding (UTF-8, BOM, bad bytes kept as surrogates)
    return html_text(text) if path.suffix.lower() in (".html", ".htm") else text


def run(args, teacher, files, result) -> None:
    pieces = read_chunks(args, files, result)
    replies = teacher.complete([user(ASK.format(n=args.questions, chunk=chunk)) for *_, chunk in pieces])
    seen: set[str] = set()
    for (doc, a, b, chunk), reply in zip(pieces, replies):
        source = f"{doc}:chars {a}-{b}"
        if not isinstance(reply, str):
            result.reject(reply.rule, source=source, error=reply.error)
            continue
        pairs = parse_qa(reply)
        if not pairs:
            result.reject("unparsed", source=source, reply=reply)
        for question, answer in pairs[args.questions:]:  # asked for --questions: the rest is counted, not used
            result.reject("extra_pairs", source=source, question=question, answer=answer)
        for question, answer in pairs[:args.questions]:
            key = " ".join(question.lower().split())
            if key in seen:
                result.reject("duplicate_question", source=source, question=question)
            elif grounded_share(answer, chunk) < args.min_grounded:
                result.reject("ungrounded", source=source, question=question, answer=answer)
            else:
                seen.add(key)
                result.keep(chat_row(question, answer, source=source, chunk=chunk, method="qa_from_docs"))
    result.extra["chunks"] = len(pieces)


def read_chunks(args, files, result) -> list[tuple[Path, int, int, str]]:
    """(document, start, end, text) of every chunk; other files and documents without text listed as skipped."""
    pieces, docs = [], 0
    for file in files:
        if file.suffix.lower() not in DOC_SUFFIXES:
            result.skip_file(file, f"unsupported suffix; qa_from_docs reads {', '.join(DOC_SUFFIXES)}")
            continue
        text = document_text(file)
        spans = chunks(text, args.max_chars, args.overlap)
        if not spans:
            result.skip_file(file, "no text")
        docs += bool(spans)
        pieces += [(file, a, b, text[a:b]) for a, b in spans]
    if not pieces:
        skipped = "; ".join(f"{s['file']}: {s['reason']}" for s in result.skipped_files[:10])
        raise DataError(f"`--data {' '.join(args.data)}` gives no document text ({skipped}). qa_from_docs needs "
                        f"{', '.join(DOC_SUFFIXES)} files with text.")
    result.extra["documents"] = docs
    return pieces
