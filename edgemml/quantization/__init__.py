"""Post-training int8 quantization: target detection, ONNX Runtime static QDQ, OpenVINO/NNCF.

The stage (edgemml/stages/quantize.py) decides what to do; these modules do it with the real
libraries and report what they did (types chosen and why, layers left in float, measured accuracy).
"""
