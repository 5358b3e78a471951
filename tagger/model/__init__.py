"""The batched-model step: the network, its bundle, its weights and what runs it.

- :mod:`.network`: timm backbone + one head per attribute; data config from the backbone; trunk/tail split;
- :mod:`.pretrained`: where ImageNet weights come from (``--init-weights``, timm's hub/cache, installed packages);
- :mod:`.bundle`: save, load and validate a model bundle; ``model_version``;
- :mod:`.settings`: the words of ``--device``/``--precision``/``--runtime`` and :class:`~.settings.RuntimeSettingError`;
- :mod:`.cpu`: native bfloat16 and the CPU's identity; :mod:`.check_images`: the generated trial/check images;
- :mod:`.engines`: ONNX Runtime and OpenVINO engines, what each computes, :class:`~.engines.RuntimeChoice`;
- :mod:`.export`: the ONNX export, cached per model_version and verified; :mod:`.int8`: its int8 quantization;
- :mod:`.choice`: ``--runtime auto``: measured once per model_version and CPU, cached;
- :mod:`.predictor`: device and precision choice; :class:`~.predictor.Predictor`: uint8 batch -> top label
  + score (+ probabilities), the one place the model runs;
- :mod:`.scoring`: images -> probabilities outside the tag job (evaluate, predict; retrain's val/test),
  through :mod:`tagger.data.reader` and the same Predictor.

Importing this package is cheap: torch and timm load with the modules that need them.
"""
