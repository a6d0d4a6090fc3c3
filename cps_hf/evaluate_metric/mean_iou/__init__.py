# Makes this folder a package so that wheels ship mean_iou.py; evaluate.load() only reads mean_iou.py.
