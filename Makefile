# Two entry points on a fresh machine (see README):  make demo  |  make test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test verify package

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# On the shipped sample CT: a short pre-training run (checkpoints, TensorBoard, encoder export), then the shipped
# encoder's patch embeddings with their PNG map. Outputs under runs/demo/.
demo: setup
	$(PY) -m monai.bundle run --config_file bundles/ctfm_pretrain/configs/train.json \
		--bundle_root runs/demo/pretrain --init_filters 8 --crop_size "[16,64,64]" --num_crops 4 \
		--batch_size 1 --num_workers 0 --epoch_length 10 --max_epochs 2 --warmup_epochs 1 --checkpoint_interval 10
	$(PY) -c "from ctfm.checkpoint import load_encoder; print(load_encoder('runs/demo/pretrain/models/encoder_hf')[1].summary())"
	$(PY) -m monai.bundle run --config_file bundles/ctfm_pretrain/configs/inference.json \
		--bundle_root bundles/ctfm_pretrain --output_dir runs/demo/embeddings

test: setup
	$(PY) ci/verify_bundle.py
	$(PY) -m pytest -q

package: setup
	$(PY) ci/package_bundle.py
