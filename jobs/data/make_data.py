"""Writes the small example inputs in jobs/data (run: python jobs/data/make_data.py).

The reactions are textbook transformations written as reaction SMILES; the prompts are plain
questions. The summarize job reads the Python documentation corpus that `rayinfer demo` writes.
"""

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


if __name__ == "__main__":
    main()
