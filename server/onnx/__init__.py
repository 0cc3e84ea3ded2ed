"""ONNX: ``loraplex export-onnx`` (offline conversion of a base + adapters into one
onnxruntime-genai model folder with swappable LoRA inputs) and the ``onnx`` serving backend.

Conversion and runtime are separate modules: ``export`` builds artifacts (``graph`` owns the
graph rewrites, ``manifest`` the export's own record); the engines only load them:
``stacked`` (rows of different adapters in one onnxruntime forward) and ``engine`` (one
onnxruntime-genai Generator per request). ``gate`` validates and converts adapters for them,
remembering the result. The adapter file format itself lives in the store
(``loraplex.server.store.onnx_adapter``).
"""
