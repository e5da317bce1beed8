"""The corpus builder: public source layouts -> a patient-disjoint `datasets.DatasetDict` with its report and card.

`build.build_corpus` is the entry point (scripts/build_corpus.py is its command line); `sources` reads each layout,
`images` decodes and hashes, `split` groups patients and near-duplicates and splits them, `report`/`card` describe
the result.
"""
