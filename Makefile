.DEFAULT_GOAL := help
VENV := .venv/bin
.PHONY: help up test unit proto lint clean  # targets, not files: the `proto` folder would make `make proto` a no-op

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

up: ## run the whole mesh locally with demo models (installs into .venv first)
	./scripts/up.sh

test: ## run lint and the whole test suite (installs what it needs first)
	./scripts/test.sh

unit: ## run the unit tests only
	$(VENV)/pytest -q tests/unit

proto: ## regenerate mesh/pb/ from proto/
	$(VENV)/python tools/genproto.py

lint: ## ruff and mypy on the hand-written packages
	$(VENV)/ruff check mesh router placement puller tests tools bench
	$(VENV)/mypy mesh router placement puller

clean: ## remove the local state of `mesh up`
	rm -rf .mesh
