"""The training side of `python train/run.py`: arguments -> data -> Trainer -> report, card and Hub folder.

`experiment.run` is the entry point; `steps` holds the stages a run and each cross-validation fold (`cv`) go
through; `input_pipeline` and `trainer` are the input path and the Trainer; `report`, `model_card` and `hub_folder`
write what a run leaves behind.
"""
