"""The YOLOv1 loss of the paper (section 2.2), vectorised over images, cells and predictors."""
import torch

from yolo.boxes import cell_to_normalized, paired_iou

# sqrt(w) has an infinite derivative at w = 0, which a saturated sigmoid can reach in low precision.
SQRT_EPS = 1e-9


def yolo_loss_terms(pred: torch.Tensor, target: torch.Tensor, lambda_coord: float = 5.0,
                    lambda_noobj: float = 0.5) -> dict[str, torch.Tensor]:
    """The four terms of the loss, each summed over cells and averaged over images.

    pred: (N, S, S, 5B + C) laid out [x, y, w, h, conf] x B then C class probabilities.
    target: (N, S, S, 5 + C) laid out [x, y, w, h, obj, one-hot class].
    Returns `coord` (already weighted by lambda_coord), `obj`, `noobj` (weighted by lambda_noobj), `cls`.
    """
    num_classes = target.shape[-1] - 5
    num_boxes = (pred.shape[-1] - num_classes) // 5
    if pred.shape[:-1] != target.shape[:-1] or pred.shape[-1] != 5 * num_boxes + num_classes:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} do not describe the same "
                         f"grid: pred needs 5 * B + C channels with C = target channels - 5 = {num_classes}.")
    # The loss is computed in at least fp32, also under autocast.
    dtype = torch.promote_types(pred.dtype, torch.float32)
    pred, target = pred.to(dtype), target.to(dtype)
    pred_boxes = pred[..., :5 * num_boxes].unflatten(-1, (num_boxes, 5))
    pred_xywh, pred_conf = pred_boxes[..., :4], pred_boxes[..., 4]
    target_xywh, has_object = target[..., :4], target[..., 4]

    with torch.no_grad():
        ious = paired_iou(cell_to_normalized(pred_xywh), cell_to_normalized(target_xywh.unsqueeze(-2)))
        # argmax returns the first maximum, so the first predictor wins ties.
        best = ious.argmax(dim=-1, keepdim=True)
        responsible = torch.zeros_like(ious).scatter_(-1, best, 1.0) * has_object.unsqueeze(-1)
        best_iou = ious.gather(-1, best).squeeze(-1)

    target_xy = target_xywh[..., :2].unsqueeze(-2)
    target_sqrt_wh = target_xywh[..., 2:].clamp(min=SQRT_EPS).sqrt().unsqueeze(-2)
    coord_error = ((pred_xywh[..., :2] - target_xy) ** 2).sum(-1) \
        + ((pred_xywh[..., 2:].clamp(min=SQRT_EPS).sqrt() - target_sqrt_wh) ** 2).sum(-1)
    responsible_conf = (pred_conf * responsible).sum(-1)
    class_error = ((pred[..., 5 * num_boxes:] - target[..., 5:]) ** 2).sum(-1)

    per_image = {
        "coord": lambda_coord * (responsible * coord_error).sum(dim=(1, 2, 3)),
        "obj": (has_object * (responsible_conf - best_iou) ** 2).sum(dim=(1, 2)),
        "noobj": lambda_noobj * ((1.0 - responsible) * pred_conf ** 2).sum(dim=(1, 2, 3)),
        "cls": (has_object * class_error).sum(dim=(1, 2)),
    }
    return {name: values.mean() for name, values in per_image.items()}


def yolo_loss(pred: torch.Tensor, target: torch.Tensor, lambda_coord: float = 5.0,
              lambda_noobj: float = 0.5) -> torch.Tensor:
    """The scalar batch loss: mean over images of the per-image sums of all four terms."""
    return sum(yolo_loss_terms(pred, target, lambda_coord, lambda_noobj).values())
