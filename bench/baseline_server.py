"""The baseline for bench_serve.py: a minimal KServe custom model in the style of KServe's
custom-model sample — a plain `kserve.Model`, `torch.tensor(payload["instances"])`, default
ModelServer settings — serving the same weights as the project's predictor.

    python bench/baseline_server.py --model_name mnist-classifier --model_dir DIR --http_port 8080
"""

import argparse

import torch
from kserve import Model, ModelServer, model_server

from mnist_kf.model import build_model


class BaselineMnist(Model):
    def __init__(self, name: str, model_dir: str):
        super().__init__(name)
        self.model_dir = model_dir
        self.load()

    def load(self) -> bool:
        self.model = build_model()
        self.model.load_state_dict(torch.load(f"{self.model_dir}/model.pt", weights_only=True))
        self.model.eval()
        self.ready = True
        return self.ready

    def predict(self, payload: dict, headers: dict | None = None) -> dict:
        inputs = torch.tensor(payload["instances"], dtype=torch.float32).reshape(-1, 784)
        inputs = (inputs / 255.0 - 0.1307) / 0.3081
        with torch.no_grad():
            output = self.model(inputs)
        return {"predictions": output.argmax(dim=1).tolist()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(parents=[model_server.parser])
    parser.add_argument("--model_dir", required=True)
    args, _ = parser.parse_known_args()
    ModelServer().start([BaselineMnist(args.model_name, args.model_dir)])
