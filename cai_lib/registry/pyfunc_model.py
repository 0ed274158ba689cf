"""The pyfunc wrapper MLflow stores with each registered model (a model from code: no pickle).

The weights are a safetensors folder logged as the artifact `weights`; this class only says
where it is. `cai_lib.registry.models.download_model` is the usual way in; `mlflow.pyfunc.load_model`
works too and `predict` returns the local weights folder.
"""
from mlflow.pyfunc import PythonModel

import mlflow


class CaiModelFolder(PythonModel):
    def load_context(self, context):
        self.folder = context.artifacts["weights"]

    def predict(self, context, model_input: list[str], params=None) -> list[str]:
        return [self.folder]


mlflow.models.set_model(CaiModelFolder())
