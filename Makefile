# Two commands on a fresh machine: `make run` (train on built-in data and serve) and `make test`.
.PHONY: run test test-latest lock format bench-quality bench-serving bench-tools clean

run:
	./scripts/run.sh

test:
	./scripts/test.sh

# The suite against the newest release of every dependency pyproject.toml admits (.venv-latest);
# `lock` also writes those versions to constraints.txt when the suite passes.
test-latest:
	./scripts/test-latest.sh

lock:
	./scripts/test-latest.sh --lock

format:
	./scripts/in-venv.sh ruff format . && ./scripts/in-venv.sh ruff check --fix .

bench-quality:
	./scripts/in-venv.sh python benchmarks/quality.py --data ../shared/data/ml-1m-half

bench-serving:
	./scripts/in-venv.sh python benchmarks/serving.py --json benchmarks/results/serving.json

# wrk (apt-get or brew) and py-spy (into .venv): what bench-serving and its --profile use.
bench-tools:
	./scripts/bench-tools.sh

clean:
	rm -rf .venv .venv-latest artifacts .pytest_cache .mypy_cache .ruff_cache
