"""An SGLang frontend program (``sgl.function`` / ``sgl.gen``) against a running minference server.

The frontend sends text, so the server needs a real checkpoint with its tokenizer, e.g.
    MODEL=/path/to/Llama-3.1-8B-Instruct LOAD_FORMAT=auto bash launch/serve_minference.sh
then
    python launch/frontend_program.py --url http://127.0.0.1:30000 [--repeat 4000]
A long synthetic document (a key hidden among filler lines) is prefilled sparse; the question is answered by
dense decode. Each follow-up question reuses the document from the radix cache and runs as a short extend.
"""

import argparse

import sglang as sgl


@sgl.function
def retrieve(s, document, questions):
    s += "Read the document and answer briefly.\n\n" + document + "\n"
    for i, question in enumerate(questions):
        s += "Question: " + question + "\nAnswer:"
        s += sgl.gen(f"answer_{i}", max_tokens=16, temperature=0.0, stop="\n")
        s += "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--repeat", type=int, default=4000, help="filler lines (about 12 tokens each)")
    args = parser.parse_args()

    sgl.set_default_backend(sgl.RuntimeEndpoint(args.url))
    filler = [f"Line {i}: the grass is green and the sky is blue." for i in range(args.repeat)]
    filler.insert(args.repeat // 3, "The secret pass key is 71432. Remember it.")
    questions = ["What is the secret pass key?", "Which colour is the sky in the document?"]
    state = retrieve.run(document="\n".join(filler), questions=questions)
    for i, question in enumerate(questions):
        print(question, "->", state[f"answer_{i}"].strip())


if __name__ == "__main__":
    main()
