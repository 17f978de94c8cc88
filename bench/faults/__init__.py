"""The fault suite (shared/RELIABILITY.md b.1/b.2, docs/RELIABILITY.md): one fault per case
against a fresh mesh on loopback under a fixed offered load, every answer checked against
onnxruntime, one row of figures per case. A benchmark-style runner, not a pytest suite:

    python -m bench.faults --case F1 [--case F8 ...] | --all [--quick] [--rate 150] [--soak-minutes 30]
"""
