# Two commands on a fresh machine: `make run` (train on built-in data and serve) and `make test`.
.PHONY: run test format bench-quality bench-serving clean

run:
	./scripts/run.sh

test:
	./scripts/test.sh

format:
	.venv/bin/ruff format . && .venv/bin/ruff check --fix .

bench-quality:
	.venv/bin/python benchmarks/quality.py --data ../shared/data/ml-1m-half

bench-serving:
	.venv/bin/python benchmarks/serving.py --json benchmarks/results/serving.json

clean:
	rm -rf .venv artifacts .pytest_cache .mypy_cache .ruff_cache
