"""Writes the small example inputs in jobs/data (run: python jobs/data/make_data.py).

The reactions are textbook transformations written as reaction SMILES; the prompts are plain
questions; the reviews are short sentences labelled positive/negative by hand (for zero-shot
classify); the sentence pairs come from the Python reference (`for` statement topic). The summarize job reads the Python documentation corpus that `rayinfer demo` writes; the perplexity job reads
that corpus's documents (their first 600 characters) each beside a copy with its words shuffled.
"""

import random
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).parent

REACTIONS = [
    ("fischer-esterification", "CC(=O)O.OCC>>CC(=O)OCC"),
    ("acid-chloride-ester", "CC(=O)Cl.OCC>>CC(=O)OCC"),
    ("suzuki-coupling", "Brc1ccccc1.OB(O)c1ccccc1>>c1ccc(-c2ccccc2)cc1"),
    ("boc-deprotection", "CC(C)(C)OC(=O)N1CCCC1>>C1CCNC1"),
    ("amide-coupling", "CC(=O)O.NCc1ccccc1>>CC(=O)NCc1ccccc1"),
    ("ketone-reduction", "CC(=O)c1ccccc1>>CC(O)c1ccccc1"),
    ("nitro-reduction", "O=[N+]([O-])c1ccccc1>>Nc1ccccc1"),
    ("williamson-ether", "Oc1ccccc1.CI>>COc1ccccc1"),
    ("ester-hydrolysis", "CCOC(=O)c1ccccc1>>O=C(O)c1ccccc1"),
    ("reductive-amination", "O=Cc1ccccc1.NC>>CNCc1ccccc1"),
    ("n-alkylation", "c1ccc(CN)cc1.BrCC>>CCNCc1ccccc1"),
    ("sulfonamide", "Cc1ccc(S(=O)(=O)Cl)cc1.NCC>>CCNS(=O)(=O)c1ccc(C)cc1"),
]


# Short reviews written for this project, labelled by hand; balanced, with some hedged or mixed
# wording so that the easy cue words are not the whole story.
REVIEWS = [
    ("The battery lasts two full days and the screen is gorgeous.", "positive"),
    ("Stopped working after a week and support never answered my emails.", "negative"),
    ("Best pizza I have had in years, the crust was perfect.", "positive"),
    ("The hotel room smelled of smoke and the sheets were stained.", "negative"),
    ("A moving film with a wonderful cast; I cried at the end.", "positive"),
    ("Two hours of my life I will never get back.", "negative"),
    ("Setup took five minutes and it has worked flawlessly since.", "positive"),
    ("The shoes fell apart on the second run.", "negative"),
    ("Friendly staff, quick service and fair prices.", "positive"),
    ("The soup was cold and the waiter was rude.", "negative"),
    ("I was sceptical at first, but this blender is now my favourite kitchen tool.", "positive"),
    ("It looks nice in the photos, but the fabric feels cheap and itchy.", "negative"),
    ("The book kept me up all night; I could not put it down.", "positive"),
    ("The plot made no sense and the dialogue was painful.", "negative"),
    ("Delivery was a day early and everything was well packed.", "positive"),
    ("The package arrived crushed and half the parts were missing.", "negative"),
    ("Our guide was knowledgeable and made the tour a joy.", "positive"),
    ("The app crashes every time I try to upload a photo.", "negative"),
    ("Great value for money, I would buy it again.", "positive"),
    ("Way too expensive for what you get.", "negative"),
    ("The headphones are comfortable and the sound is crisp and clear.", "positive"),
    ("The noise from the street kept us awake every night.", "negative"),
    ("Not cheap, but worth every penny.", "positive"),
    ("I wanted to like it, but it is slow and clumsy to use.", "negative"),
    ("The kids loved the museum, especially the dinosaur hall.", "positive"),
    ("The instructions were confusing and two screws did not fit.", "negative"),
    ("A cosy little cafe with the best cinnamon rolls in town.", "positive"),
    ("The flight was delayed six hours and nobody told us why.", "negative"),
    ("Excellent customer service: they replaced it without any questions.", "positive"),
    ("The paint started peeling after the first rain.", "negative"),
    ("This is exactly what I was looking for.", "positive"),
    ("I returned it the next day.", "negative"),
    ("The concert was loud, joyful and over far too soon.", "positive"),
    ("Bland food, tiny portions and a forty minute wait.", "negative"),
    ("My dog adores these treats and they do not upset his stomach.", "positive"),
    ("The charger gets worryingly hot after a few minutes.", "negative"),
    ("A clever, funny script and a lead actor at the top of his game.", "positive"),
    ("The course was disorganised and the teacher often did not show up.", "negative"),
    ("The garden was beautifully kept and the view was stunning.", "positive"),
    ("Customer support put me on hold for an hour and then hung up.", "negative"),
]


def mask_first_product_atom(rxn: str) -> str:
    reactants, product = rxn.split(">>")
    for atom in ("N", "O", "C", "c"):
        i = product.find(atom)
        if i >= 0 and not product[i + 1 : i + 2].islower() and product[i : i + 2] not in ("Cl", "Br"):
            return f"{reactants}>>{product[:i]}[MASK]{product[i + 1:]}"
    return rxn


def main() -> None:
    names, rxns = zip(*REACTIONS)
    pq.write_table(
        pa.table({"id": list(names), "rxn": list(rxns), "masked": [mask_first_product_atom(r) for r in rxns]}),
        HERE / "reactions.parquet",
    )
    prompts = [
        "What is the capital of France?",
        "Explain in one sentence what a Python list comprehension is.",
        "Give three tips for writing clear commit messages.",
        "Write a haiku about the sea.",
        "What does the acronym CPU stand for?",
        "Name two differences between a process and a thread.",
    ]
    pq.write_table(pa.table({"id": list(range(len(prompts))), "prompt": prompts}), HERE / "prompts.parquet")
    texts, labels = zip(*REVIEWS)
    pq.write_table(
        pa.table({"id": [f"review-{i:02d}" for i in range(len(texts))], "text": list(texts), "gold": list(labels)}),
        HERE / "reviews.parquet",
    )
    # sentence pairs for nsp: each sentence with the one that follows it, and with one far away
    from pydoc_data.topics import topics

    sents = [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", re.sub(r"\s+", " ", topics["for"])) if 20 < len(s) < 200]
    pairs = [(sents[i], sents[i + 1], True) for i in range(6)] + [(sents[i], sents[-1 - i], False) for i in range(6)]
    pq.write_table(
        pa.table({
            "id": list(range(len(pairs))), "first": [p[0] for p in pairs], "second": [p[1] for p in pairs],
            "follows": [p[2] for p in pairs],
        }),
        HERE / "sentence-pairs.parquet",
    )
    # the demo corpus's documents as written, and each with the same words in a random order
    from rayinfer.demo import documents

    rows = []
    for doc in documents(max_chars=600):
        words = doc["text"].split()
        shuffled = random.Random(doc["doc_id"]).sample(words, len(words))
        rows.append({"id": f"{doc['doc_id']}/prose", "doc": doc["doc_id"], "kind": "prose", "text": " ".join(words)})
        rows.append({"id": f"{doc['doc_id']}/shuffled", "doc": doc["doc_id"], "kind": "shuffled", "text": " ".join(shuffled)})
    pq.write_table(pa.Table.from_pylist(rows), HERE / "prose-vs-shuffled.parquet")


if __name__ == "__main__":
    main()
