"""The small real data sets bundled with healthfm (see ``healthfm/data/*/README.md``)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def data_path(*parts: str) -> Path:
    """Path of a bundled data file, e.g. ``data_path("dna", "splice.tsv")``."""
    path = Path(str(resources.files("healthfm").joinpath("data", *parts)))
    if not path.exists():
        raise FileNotFoundError(f"bundled data file not found: {path}")
    return path


def splice() -> Path:
    """UCI primate splice junctions (3,188 × 60 nt; EI / IE / N), via PMLB. CC BY 4.0."""
    return data_path("dna", "splice.tsv")


def promoters() -> Path:
    """UCI E. coli promoters (106 × 57 nt; promoter / non_promoter), via PMLB. CC BY 4.0."""
    return data_path("dna", "promoters.tsv")


#: The bundled Klebsiella pneumoniae genomes (chromosome + plasmids each; NCBI GenBank).
GENOMES = ("Klebs_HS11286", "Klebs_Kp1084", "MGH78578", "NTUH-K2044")


def genomes() -> list[Path]:
    """Four complete *Klebsiella pneumoniae* genomes (22.2 Mb in all, gzipped FASTA): a
    real DNA pretraining corpus. GenBank sequence data, no use restrictions."""
    return [data_path("dna", "genomes", f"{name}.fna.gz") for name in GENOMES]
