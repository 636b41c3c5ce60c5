"""qa_from_docs: question-answer pairs grounded in documents (a knowledge base -> instruction data).

Documents: .txt, .md/.markdown (read as they are) and .html/.htm (visible text, through the standard library's
html.parser). Each is cut into chunks (parse.chunks: paragraphs and headings packed up to --max-chars, with
--overlap characters carried over), and for each chunk the teacher writes up to --questions pairs answerable from
the chunk alone. Rules: `unparsed` (no Q/A pair in the reply), `ungrounded` (fewer than --min-grounded of the
answer's content words are in the chunk), `duplicate_question`. Every row names its chunk: `source` is
`file:chars A-B` (0-based, end exclusive, in the document's text: the HTML's visible text for .html) and
`chunk` holds the text itself.
"""

from __future__ import annotations

from pathlib import Path

from tuneforge.data import readers
from tuneforge.data.curate.synth import chat_row, user
from tuneforge.data.curate.synth.parse import chunks, grounded_share, html_text, parse_qa
from tuneforge.errors import DataError, UserError

DOC_SUFFIXES = (".txt", ".md", ".markdown", ".html", ".htm")
ASK = ("Read the text below and write {n} question-answer pairs that a reader could ask about it. Each answer must "
       "be found in the text alone; quote its words where you can. Use this format:\nQ: <question>\nA: <answer>\n\n"
       "Text:\n\"\"\"\n{chunk}\n\"\"\"")


def document_text(path: Path) -> str:
    text = readers.read_text(path)  # the data path's decoding (UTF-8, BOM, bad bytes kept as surrogates)
    return html_text(text) if path.suffix.lower() in (".html", ".htm") else text


def run(args, teacher, files, result) -> None:
    if args.max_chars < 100 or not 0 <= args.overlap < args.max_chars // 2:
        raise UserError(f"`--max-chars` must be >= 100 and `--overlap` between 0 and half of it; got "
                        f"{args.max_chars} and {args.overlap}.")
    docs = [f for f in files if f.suffix.lower() in DOC_SUFFIXES]
    if not docs:
        raise DataError(f"No documents among {', '.join(map(str, files))}: qa_from_docs reads "
                        f"{', '.join(DOC_SUFFIXES)} files.")
    pieces = []
    for doc in docs:
        text = document_text(doc)
        pieces += [(doc, a, b, text[a:b]) for a, b in chunks(text, args.max_chars, args.overlap)]
    replies = teacher.complete([user(ASK.format(n=args.questions, chunk=chunk)) for *_, chunk in pieces])
    seen: set[str] = set()
    for (doc, a, b, chunk), reply in zip(pieces, replies):
        source = f"{doc}:chars {a}-{b}"
        pairs = parse_qa(reply) if reply is not None else []
        if not pairs:
            result.reject("unparsed" if reply is not None else "teacher_failed", source=source, reply=reply)
        for question, answer in pairs[:args.questions]:
            key = " ".join(question.lower().split())
            if key in seen:
                result.reject("duplicate_question", source=source, question=question)
            elif grounded_share(answer, chunk) < args.min_grounded:
                result.reject("ungrounded", source=source, question=question, answer=answer)
            else:
                seen.add(key)
                result.keep(chat_row(question, answer, source=source, chunk=chunk, method="qa_from_docs"))
    result.extra["documents"] = len(docs)
    result.extra["chunks"] = len(pieces)
