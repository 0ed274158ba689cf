"""The pyfunc model MLflow stores with each registered model: a model from code, so nothing is
pickled. The weights are the safetensors artifact `weights`; `model_config` names the kind
(sl / rl: a policy that answers, pm: a reward model that scores) and the weights' sha256.
All the work is in `cai_lib.registry.serving`, which travels with the model (code_paths).

    m = mlflow.pyfunc.load_model("models:/cai-rl@champion")
    m.predict(pd.DataFrame({"prompt": ["How do I kill a stuck process on Linux?"]}),
              params={"max_new_tokens": 64, "temperature": 0.0})
"""
import mlflow
from mlflow.pyfunc import PythonModel


class CaiModel(PythonModel):
    def load_context(self, context):
        from cai_lib.registry.serving import load_servable
        self.servable = load_servable(context.artifacts["weights"], context.model_config or {})

    def predict(self, context, model_input, params=None):
        return self.servable.predict(model_input, params)


mlflow.models.set_model(CaiModel())
