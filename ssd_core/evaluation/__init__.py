"""Detection quality: mAP over a data set, the paired bootstrap of mAP@0.5, detections drawn."""

from ssd_core.evaluation.bootstrap import MatchedDetections, average_precisions, match_detections
from ssd_core.evaluation.drawing import captions, draw_detections
from ssd_core.evaluation.mean_ap import average_precision_50, evaluate, mean_average_precision, predict

__all__ = ["MatchedDetections", "average_precision_50", "average_precisions", "captions", "draw_detections", "evaluate", "match_detections", "mean_average_precision", "predict"]
