"""cai_lib: the library behind the `cai` jobs, one subpackage per concern (see docs/architecture.md).

Foundation modules, imported by every subpackage: `config` (typed job configs from params.yaml
and flags), `ids` (deterministic ids, seeds and held-out splits), `env` (offline defaults),
`files` (atomic writes). Layering: jobs -> cai_lib -> schemas, never back.
"""
