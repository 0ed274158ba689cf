"""MLflow: tracking runs with their lineage, the model registry, the pyfunc wrapper.

tracking      configure the store, open a training run that logs its tables, versions, gates and commit
models        register a safetensors folder, resolve NAME[:VERSION|@ALIAS] to local weights, aliases
lineage       a model version -> its run, tables + versions, gate verdicts, parents, commit; its whole ancestry
card          the model card of a version (description + tags): data, gates, labeller, evaluation, decision
pyfunc_model  the model-from-code MLflow stores with each version (no pickle)
serving       what a loaded version does: a policy answers prompts or chats, the PM scores; sha-checked loads
"""
