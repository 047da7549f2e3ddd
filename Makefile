# Two entry points on a fresh machine (see README):  make demo  |  make test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test test-fast package publish

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# On the shipped sample data: a short pre-training run (checkpoints, TensorBoard, encoder export), then every
# bundle's inference on the sample CTs (the NIfTI CT and the DICOM series) and, for triage, on four demo head
# phantoms and on the real head CT with synthetic bleeds (fetched from Debian; skipped if that fails); retrieval
# embeds the two sample CTs into a store, indexes it and searches it with the small sample CT (CSV + contact
# sheet). Outputs under runs/demo/.
demo: setup
	$(PY) -m monai.bundle run --config_file bundles/ctfm_pretrain/configs/train.json \
		--bundle_root runs/demo/pretrain --num_crops 4 --num_workers 0 --epoch_length 10 --max_epochs 2 \
		--warmup_iterations 10 --checkpoint_interval 10
	$(PY) -c "from ctfm.checkpoint import load_encoder; print(load_encoder('runs/demo/pretrain/models/encoder_hf')[1].summary())"
	$(PY) -m monai.bundle run --config_file bundles/ctfm_pretrain/configs/inference.json --output_dir runs/demo/embeddings
	$(PY) -m monai.bundle run --config_file bundles/ctfm_segmentation/configs/inference.json --output_dir runs/demo/segmentation
	$(PY) -m monai.bundle run --config_file bundles/ctfm_triage/configs/inference.json \
		--datalist "imagesTs/head_test_00[0-3].nii.gz" --output_dir runs/demo/triage
	-$(PY) -m monai.bundle run --config_file bundles/ctfm_triage/configs/inference.json \
		--dataset_dir "$$($(PY) -m ctfm.triage.demo real)" --output_dir runs/demo/triage_real_head
	$(PY) -m monai.bundle run --config_file bundles/ctfm_retrieval/configs/extract.json \
		--store_dir runs/demo/retrieval/store --overlap 0.0
	$(PY) -m monai.bundle run --config_file "['bundles/ctfm_retrieval/configs/extract.json','bundles/ctfm_retrieval/configs/index.json']" \
		--store_dir runs/demo/retrieval/store --index_dir runs/demo/retrieval/index --overlap 0.0
	$(PY) -m monai.bundle run --config_file "['bundles/ctfm_retrieval/configs/extract.json','bundles/ctfm_retrieval/configs/query.json']" \
		--store_dir runs/demo/retrieval/store --index_dir runs/demo/retrieval/index --overlap 0.0 --output_dir runs/demo/retrieval
	@echo "demo outputs:"
	@find runs/demo/pretrain/models/encoder_hf runs/demo/pretrain/runs runs/demo/embeddings runs/demo/segmentation \
		runs/demo/triage runs/demo/triage_real_head runs/demo/retrieval/query -type f 2>/dev/null | sort

# The fast tier (in-process, a few minutes) alone; `make test` (what CI runs) runs both tiers.
test-fast: setup
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

test: setup
	$(PY) ci/verify_bundle.py --full
	$(PY) ci/check_lighter_zoo.py
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25

package: setup
	$(PY) ci/package_bundle.py

# A registry folder (index, zips, the ctfm wheel as a PEP 503 index, Hugging Face folders) in dist/registry/
publish: setup
	$(PY) -m ctfm.registry publish --out dist/registry
