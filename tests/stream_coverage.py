"""Run under torchrun by tests/test_streaming.py: builds a streamed run as `transferkit train`
does and writes, from the main process, the sample ids every process read in each epoch."""

import json
import sys

from accelerate.utils import gather_object

from transferkit.engine.accelerator import make_accelerator
from transferkit.engine.build import build_run
from transferkit.recipes import load_recipe

recipe = load_recipe(sys.argv[1])
accelerator = make_accelerator(recipe, device="cpu")
run = build_run(recipe, accelerator)
epochs = []
for epoch in range(recipe.train.epochs):
    run.train_loader.set_epoch(epoch)
    ids = [int(i) for batch in run.train_loader for i in batch["targets"]["id"].tolist()]
    epochs.append(gather_object([ids]))  # one list per process
if accelerator.is_main_process:
    with open(sys.argv[2], "w") as out:
        json.dump(epochs, out)
