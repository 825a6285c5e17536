"""Every metric of helpers.evaluate on small hand-made logits with known answers; the threshold search
reproduces its target exit shares; real early exit gives the simulated answers and skips the work."""
import math
import time

import pytest
import torch

from helpers import data, earlyexit, evaluate, msdnet, policies


def hand_made() -> evaluate.Predictions:
    """4 images, 3 exits, 2 classes. Right/wrong per exit:
    image 0 (label 0): R R R;  image 1 (label 1): W R R;  image 2 (label 0): R W R;  image 3 (label 1): W W W."""
    right, wrong = {0: [3.0, 0.0], 1: [0.0, 3.0]}, {0: [0.0, 3.0], 1: [3.0, 0.0]}
    pattern = ["RRR", "WRR", "RWR", "WWW"]
    labels = [0, 1, 0, 1]
    logits = [[(right if c == "R" else wrong)[y] for c in row] for row, y in zip(pattern, labels)]
    return evaluate.Predictions(torch.tensor(logits), torch.tensor(labels))


def test_correct_difficulty_and_accuracy_per_exit():
    p = hand_made()
    assert p.correct.tolist() == [[True] * 3, [False, True, True], [True, False, True], [False] * 3]
    assert evaluate.difficulty(p).tolist() == [3, 2, 2, 0]
    acc, low, high = evaluate.accuracy_with_ci(p.correct)
    assert acc.tolist() == [0.5, 0.5, 0.75]
    assert (low <= acc).all() and (acc <= high).all()


def test_wilson_interval_matches_published_values():
    fifty = torch.tensor([True] * 50 + [False] * 50)[:, None]
    _, low, high = evaluate.accuracy_with_ci(fifty)
    assert (low.item(), high.item()) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    none = torch.zeros(10, 1, dtype=torch.bool)
    _, low, high = evaluate.accuracy_with_ci(none)
    assert (low.item(), high.item()) == pytest.approx((0.0, 0.2775), abs=1e-4)


def test_class_by_exit_accuracy():
    table = evaluate.class_exit_accuracy(hand_made())
    # class 0: images 0 and 2 -> R R R and R W R; class 1: images 1 and 3 -> W R R and W W W
    assert table.tolist() == [[1.0, 0.5, 1.0], [0.0, 0.5, 0.5]]


def test_right_then_wrong_counts_what_a_later_exit_forgets():
    m = evaluate.right_then_wrong(hand_made())
    assert m[0, 1].item() == pytest.approx(1 / 4)  # image 2: B1 right, B2 wrong
    assert m[1, 0].item() == pytest.approx(1 / 4)  # image 1: B2 right, B1 wrong
    assert m[0, 2].item() == 0 and m.diagonal().abs().sum() == 0


def test_exit_shares_follow_q_to_the_k():
    s = policies.exit_shares(0.5, 4)
    assert s.sum().item() == pytest.approx(1)
    assert (s[1:] / s[:-1]).tolist() == pytest.approx([0.5] * 3)
    assert policies.exit_shares(1.0, 5).tolist() == pytest.approx([0.2] * 5)


@pytest.mark.parametrize("q", [0.5, 0.8, 1.0, 1.5])
def test_thresholds_reproduce_the_target_exit_shares_on_validation(q):
    g = torch.Generator().manual_seed(0)
    n, exits = 5000, 10
    # float64: no two images share a confidence (float32 softmax gave one tie on an AVX2 machine, and a
    # threshold cannot split a tie, so one image more left at B2 than the target share).
    logits = torch.randn(n, exits, 10, generator=g, dtype=torch.float64) * 3
    val = evaluate.Predictions(logits, torch.randint(0, 10, (n,), generator=g))
    assert all(val.confidence[:, k].unique().numel() == n for k in range(exits))
    thresholds = policies.budget_thresholds(val, q)
    counts = torch.bincount(policies.exit_points(val.confidence, thresholds) - 1, minlength=exits)
    want = policies.exit_shares(q, exits) * n
    assert counts[:-1].tolist() == [math.floor(w) for w in want[:-1].tolist()]
    assert counts.sum() == n


def test_budgeted_accuracy_and_cost():
    p = hand_made()  # all confidences are equal (softmax of [3, 0]); a threshold of 0 sends everyone out at B1
    costs = [msdnet.ExitCost(k + 1, 0, macs) for k, macs in enumerate([10, 20, 30])]
    first = policies.budgeted(p, torch.tensor([0.0, 0.0, -math.inf]), costs)
    assert (first.accuracy, first.average_cost, first.exit_counts) == (0.5, 10.0, [4, 0, 0])
    last = policies.budgeted(p, torch.tensor([math.inf, math.inf, -math.inf]), costs)
    assert (last.accuracy, last.average_cost, last.exit_counts) == (0.75, 30.0, [0, 0, 4])


@pytest.mark.parametrize("kind", ["macs", "seconds"])
def test_a_skipped_exit_costs_no_classifier(kind):
    p = hand_made()
    # blocks cost 8 each, classifiers 2 each: exits cost 10, 20, 30 when every classifier runs; the same
    # whether the costs are counted (multiply-accumulates) or measured (seconds)
    if kind == "macs":
        costs = [msdnet.ExitCost(k + 1, 0, total, 2) for k, total in enumerate([10, 20, 30])]
    else:
        costs = [policies.ExitTime(k + 1, float(total), 2.0) for k, total in enumerate([10, 20, 30])]
    everyone_at_b3 = policies.budgeted(p, torch.tensor([0.999, 0.999, -math.inf]), costs)
    assert (everyone_at_b3.average_cost, everyone_at_b3.exit_counts) == (30.0, [0, 0, 4])  # B1's and B2's classifiers ran
    skip_b2 = policies.budgeted(p, torch.tensor([0.999, math.inf, -math.inf]), costs)
    assert (skip_b2.average_cost, skip_b2.exit_counts) == (28.0, [0, 0, 4])  # B2's classifier never ran
    skip_both = policies.budgeted(p, torch.tensor([math.inf, math.inf, -math.inf]), costs)
    assert skip_both.average_cost == 26.0  # every block, the last classifier only: the full network


def test_real_early_exit_runs_no_classifier_at_a_skipped_exit():
    model = msdnet.build("tiny").eval()
    ran = []
    for k, clf in enumerate(model.classifiers):
        clf.register_forward_hook(lambda m, i, o, k=k: ran.append(k))
    x = torch.rand(6, 3, 32, 32)
    skip_b2 = torch.tensor([0.99, math.inf, 0.0, -math.inf])  # B1 strict, B2 skipped, B3 takes everyone left
    got_class, got_exit = earlyexit.EarlyExit(model, skip_b2)(x)
    assert 1 not in ran and 0 in ran and 2 in ran
    with torch.no_grad():
        logits = torch.stack(model(x), 1)
    want_exit = policies.exit_points(logits.softmax(-1).amax(-1), skip_b2)
    assert got_exit.tolist() == want_exit.tolist() and 2 not in got_exit.tolist()  # exit numbers: B2 skipped
    assert got_class.tolist() == logits.argmax(-1).gather(1, want_exit[:, None] - 1).squeeze(1).tolist()


def test_real_early_exit_gives_the_simulated_answers(tiny_folder):
    model = msdnet.build("tiny").eval()
    split = data.load("test", source=tiny_folder)
    preds = evaluate.predict(model, split, cache=False)
    thresholds = torch.quantile(preds.confidence, 0.6, dim=0)  # some images leave at each exit
    want_exit = policies.exit_points(preds.confidence, thresholds)
    got_class, got_exit = earlyexit.EarlyExit(model, thresholds)(split.images.float() / 255)
    assert len(set(want_exit.tolist())) > 1
    assert got_exit.tolist() == want_exit.tolist()
    assert got_class.tolist() == preds.predicted.gather(1, want_exit[:, None] - 1).squeeze(1).tolist()


@pytest.mark.parametrize("batch_size", [1, 7, 16, 1000])
def test_streamed_early_exit_gives_the_same_answers_with_full_batches(tiny_folder, batch_size):
    model = msdnet.build("tiny").eval()
    split = data.load("test", source=tiny_folder)
    preds = evaluate.predict(model, split, cache=False)
    # About as many images leave at every exit. Those thresholds are some image's own score: moved a
    # hair down, so that rounding (which depends on the batch an image runs in) cannot tip it.
    thresholds = policies.budget_thresholds(preds, q=1.0) - 1e-5
    want_exit = policies.exit_points(preds.confidence, thresholds)
    early = earlyexit.EarlyExit(model, thresholds)
    sizes = {k: [] for k in range(model.n_exits)}  # the batch each block ran on
    for k, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, i, o, k=k: sizes[k].append(len(o[-1] if isinstance(o, list) else o)))
    got_class, got_exit = earlyexit.EarlyExitStream(early, batch_size)(split.images.float() / 255)
    assert set(want_exit.tolist()) == set(range(1, model.n_exits + 1))
    assert got_exit.tolist() == want_exit.tolist()
    assert got_class.tolist() == preds.predicted.gather(1, want_exit[:, None] - 1).squeeze(1).tolist()
    for k in range(model.n_exits):  # every image reaching block k went through it once
        assert sum(sizes[k]) == int((want_exit >= k + 1).sum())
        # Each block runs on exactly batch_size images but for the last time, on the stragglers.
        assert all(b == batch_size for b in sizes[k][:-1]) and 0 < sizes[k][-1] <= batch_size
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1, got 0"):
        earlyexit.EarlyExitStream(early, 0)


@pytest.mark.parametrize("batch_size", [5, 16])
def test_a_stream_runs_every_block_on_batch_size_images_until_finish(batch_size):
    torch.manual_seed(0)
    model = msdnet.build("tiny").eval()
    images = torch.rand(300, 3, 32, 32)
    with torch.no_grad():
        confidence = torch.stack([logits.softmax(-1).amax(-1) for logits in model(images)], 1)  # [N, exits]
    early = earlyexit.EarlyExit(model, confidence.quantile(0.75, dim=0))  # about a quarter leave at each exit
    want_class, want_exit = early(images)
    sizes = {k: [] for k in range(model.n_exits)}  # the batch each block ran on
    for k, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, i, o, k=k: sizes[k].append(len(o[-1])))
    stream = earlyexit.EarlyExitStream(early, batch_size)
    for start, stop in [(0, 3), (3, 120), (120, 121), (121, 300)]:
        stream.feed(images[start:stop])
    got_class, got_exit = stream.finish()
    assert got_exit.tolist() == want_exit.tolist() and got_class.tolist() == want_class.tolist()
    for k in range(model.n_exits):
        assert sum(sizes[k]) == int((want_exit >= k + 1).sum()) and len(sizes[k]) > 2
        assert all(b == batch_size for b in sizes[k][:-1]) and 0 < sizes[k][-1] <= batch_size


def test_a_stream_fed_in_uneven_batches_answers_in_feeding_order(tiny_folder):
    model = msdnet.build("tiny").eval()
    images = data.load("test", source=tiny_folder).images.float() / 255
    preds = evaluate.predict(model, data.load("test", source=tiny_folder), cache=False)
    thresholds = policies.budget_thresholds(preds, q=1.0) - 1e-5
    early = earlyexit.EarlyExit(model, thresholds)
    want_class, want_exit = early(images)
    stream = earlyexit.EarlyExitStream(early, batch_size=8)
    for start, stop in [(0, 3), (3, 20), (20, 21), (21, len(images))]:
        stream.feed(images[start:stop])
    got_class, got_exit = stream.finish()
    assert got_exit.tolist() == want_exit.tolist() and got_class.tolist() == want_class.tolist()
    stream.feed(images[:5])  # finish emptied the stream: numbering starts again
    with pytest.raises(ValueError, match=r"expects images in \[0, 1\]"):
        stream.feed(images[5:9] * 255)  # refused: the stream is left as it was
    with pytest.raises(RuntimeError, match="5 fed images wait for finish"):
        stream(images)  # would lose the 5 fed ones
    again_class, again_exit = stream.finish()
    assert again_exit.tolist() == want_exit[:5].tolist() and again_class.tolist() == want_class[:5].tolist()
    nothing_class, nothing_exit = stream.finish()  # nothing fed: no answers
    assert nothing_class.shape == nothing_exit.shape == (0,) and nothing_exit.dtype == torch.long


def test_real_early_exit_skips_the_later_blocks():
    model = msdnet.build("tiny").eval()
    ran = []
    for b, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, i, o, b=b: ran.append(b))
    everyone_leaves = torch.zeros(model.n_exits)
    _, exits = earlyexit.EarlyExit(model, everyone_leaves)(torch.rand(5, 3, 32, 32))
    assert exits.tolist() == [1] * 5 and ran == [0]  # everyone leaves at B1


def test_predictions_are_cached_by_weights_and_images(tiny_folder, tmp_path, monkeypatch):
    model = msdnet.build("tiny").eval()
    split = data.load("test", source=tiny_folder)
    first = evaluate.predict(model, split, cache_dir=tmp_path)
    assert first.logits.shape == (len(split), 4, 10) and len(list(tmp_path.glob("predictions-*.pt"))) == 1
    with monkeypatch.context() as m:  # undone even when the assertion fails
        m.setattr(model, "forward", lambda *a, **k: pytest.fail("recomputed instead of reading the cache"))
        again = evaluate.predict(model, split, cache_dir=tmp_path)
    assert torch.equal(again.logits, first.logits) and torch.equal(again.labels, split.labels)
    with torch.no_grad():
        model.classifiers[0].linear.bias += 1  # other weights: another cache entry
    evaluate.predict(model, split, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("predictions-*.pt"))) == 2
    assert not list(tmp_path.glob(".*"))


def test_last_exit_only_is_the_full_networks_last_exit():
    model = msdnet.build("tiny").eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(earlyexit.LastExitOnly(model)(x), model(x)[-1])


def test_cheapest_matching_reaches_the_target_at_the_lowest_cost():
    g = torch.Generator().manual_seed(1)
    n = 2000
    labels = torch.randint(0, 10, (n,), generator=g)
    logits = torch.randn(n, 4, 10, generator=g)
    logits[torch.arange(n), :, labels] += torch.linspace(0.5, 3, 4)  # later exits are more often right
    val = evaluate.Predictions(logits, labels)
    costs = [msdnet.ExitCost(k + 1, 0, 10 * (k + 1)) for k in range(4)]
    target = val.correct[:, 2].double().mean().item()  # as good as exit 3, cheaper
    q, thresholds = policies.cheapest_matching(val, costs, target)
    chosen = policies.budgeted(val, thresholds, costs)
    curve = policies.budget_curve(val, val, costs)
    assert chosen.accuracy >= target
    assert chosen.average_cost == min(r.average_cost for _, r in curve if r.accuracy >= target)
    with pytest.raises(ValueError, match="no q reaches"):
        policies.cheapest_matching(val, costs, 1.0)  # a valid target no q reaches


def test_flip_averages_each_exits_logits_for_the_image_and_its_mirror(tiny_folder, tmp_path):
    model = msdnet.build("tiny").eval()
    split = data.load("test", source=tiny_folder)  # its blue channel varies along x: a mirror is another image
    x = split.images.float() / 255
    with torch.no_grad():
        want = (torch.stack(model(x), 1) + torch.stack(model(x.flip(-1)), 1)) / 2
    flipped = evaluate.predict(model, split, cache_dir=tmp_path, flip=True)
    assert torch.allclose(flipped.logits, want, atol=1e-5)
    plain = evaluate.predict(model, split, cache_dir=tmp_path)
    assert not torch.allclose(plain.logits, flipped.logits, atol=1e-3)  # cached apart, never mixed up
    assert len(list(tmp_path.glob("predictions_flip-*.pt"))) == len(list(tmp_path.glob("predictions-*.pt"))) == 1


def test_exit_accuracies_with_flip_agree_with_flipped_predictions(tiny_folder):
    model = msdnet.build("tiny").eval()
    split = data.load("test", source=tiny_folder)
    preds = evaluate.predict(model, split, cache=False, flip=True)
    assert evaluate.exit_accuracies(model, split, batch_size=7, flip=True) == pytest.approx(
        preds.correct.double().mean(0).tolist())


def test_a_truncated_predictions_cache_is_recomputed(tiny_folder, tmp_path):
    model = msdnet.build("tiny").eval()
    split = data.load("test", source=tiny_folder)
    first = evaluate.predict(model, split, cache_dir=tmp_path)
    (cached,) = tmp_path.glob("predictions-*.pt")
    cached.write_bytes(cached.read_bytes()[:100])
    again = evaluate.predict(model, split, cache_dir=tmp_path)
    assert torch.equal(again.logits, first.logits)
    assert torch.load(cached, weights_only=True)["logits"].shape == first.logits.shape  # rewritten whole


def test_scores_have_their_known_values():
    p = evaluate.Predictions(torch.tensor([[[2.0, 0.0, 0.0]]]), torch.tensor([0]))
    e2 = math.exp(2)
    probs = [e2 / (e2 + 2), 1 / (e2 + 2), 1 / (e2 + 2)]
    assert p.scores("confidence").item() == pytest.approx(probs[0])
    assert p.scores("margin").item() == pytest.approx(probs[0] - probs[1])
    assert p.scores("entropy").item() == pytest.approx(sum(q * math.log(q) for q in probs))
    with pytest.raises(ValueError, match="score must be one of"):
        p.scores("vibes")


def policy_case() -> tuple[evaluate.Predictions, list[msdnet.ExitCost]]:
    """4 images, 3 exits costing 1, 2, 3; label 0 for all. Confidence (and right or wrong) per exit:
    exit 1: 0.9 R, 0.8 W, 0.7 R, 0.6 R;  exit 2: 0.55 R for all;  exit 3: 0.51 R for all."""
    def logit(p: float, right: bool) -> list[float]:
        d = math.log(p / (1 - p))  # two classes: softmax([d, 0]) = (p, 1 - p)
        return [d, 0.0] if right else [0.0, d]

    first = [(0.9, True), (0.8, False), (0.7, True), (0.6, True)]
    logits = [[logit(*first[i]), logit(0.55, True), logit(0.51, True)] for i in range(4)]
    costs = [msdnet.ExitCost(k, 0, k) for k in (1, 2, 3)]
    return evaluate.Predictions(torch.tensor(logits), torch.zeros(4, dtype=torch.long)), costs


def test_one_threshold_is_the_lowest_that_keeps_the_accuracy():
    val, costs = policy_case()
    t = policies.one_threshold(val, costs, target=1.0)
    # Any threshold at or under 0.8 lets image 1 leave wrong at exit 1; 0.9 lets only image 0 leave early.
    assert t[0].item() == pytest.approx(0.9) and t[1].item() == pytest.approx(0.9) and t[2] == -math.inf
    r = policies.budgeted(val, t, costs)
    assert (r.accuracy, r.average_cost, r.exit_counts) == (1.0, 2.5, [1, 0, 3])
    # A looser target lets everyone leave at exit 1 (3 of 4 right there).
    assert policies.budgeted(val, policies.one_threshold(val, costs, target=0.75), costs).average_cost == 1.0


def test_a_target_read_from_a_float32_tensor_is_reached_by_the_accuracy_it_was_read_from():
    """3 of 10 right at both exits, the same images: exit 1 loses nothing. float32(0.3) is 0.30000001, a
    hair above 3/10; read as the target, it must still let every image leave at exit 1, with or without a
    margin (the paired difference is 0, so its standard error is 0 too)."""
    right = [True] * 3 + [False] * 7
    logits = torch.tensor([[[2.0, 0.0] if r else [0.0, 2.0]] * 2 for r in right])
    val = evaluate.Predictions(logits, torch.zeros(10, dtype=torch.long))
    costs = [msdnet.ExitCost(k, 0, k) for k in (1, 2)]
    target = val.correct[:, -1].float().mean().item()  # as a reader writes it
    assert target > 3 / 10
    for search in (policies.one_threshold, policies.per_exit_thresholds):
        for safety in (0.0, 2.0):
            r = policies.budgeted(val, search(val, costs, target, safety=safety), costs)
            assert (r.accuracy, r.exit_counts) == (0.3, [10, 0]), (search.__name__, safety)


def test_a_safety_margin_refuses_thresholds_that_pass_by_a_hair():
    val, costs = policy_case()
    # Without a margin, 3 of 4 right meets a target of 0.75: everyone leaves at exit 1.
    assert policies.budgeted(val, policies.one_threshold(val, costs, 0.75), costs).average_cost == 1.0
    # With one standard error of the paired difference from the last exit: one image of 4 that the
    # last exit gets right is lost, so the difference is -1/4 with standard error
    # sqrt((1/4 - 1/16) / 4) = 0.217, and 0.75 - 0.217 < 0.75. Only thresholds that lose nobody
    # (error 0) pass: 0.9, the lowest that keeps image 1 from leaving wrong.
    for search in (policies.one_threshold, policies.per_exit_thresholds):
        t = search(val, costs, 0.75, safety=1.0)
        assert t[0].item() == pytest.approx(0.9)
        r = policies.budgeted(val, t, costs)
        assert r.accuracy == 1.0 and r.exit_counts[0] == 1
    # Half a standard error: 0.75 - 0.108 = 0.642 clears a target of 0.64 (everyone leaves at exit 1)
    # but not one of 0.65.
    assert policies.budgeted(val, policies.one_threshold(val, costs, 0.64, safety=0.5), costs).average_cost == 1.0
    assert policies.one_threshold(val, costs, 0.65, safety=0.5)[0].item() == pytest.approx(0.9)


def test_per_exit_thresholds_find_the_cheaper_split():
    val, costs = policy_case()
    t = policies.per_exit_thresholds(val, costs, target=1.0)
    r = policies.budgeted(val, t, costs)
    # Exit 1 keeps 0.9 (image 1 is wrong there); exit 2 lets the other three leave: (1 + 2 + 2 + 2) / 4.
    assert (r.accuracy, r.average_cost, r.exit_counts) == (1.0, 1.75, [1, 3, 0])
    assert r.average_cost < policies.budgeted(val, policies.one_threshold(val, costs, 1.0), costs).average_cost


def test_per_exit_thresholds_also_start_from_every_exit_switched_off():
    # 4 images, 3 exits, 2 classes; blocks cost 6 and classifiers 4 (exits 10, 20, 30 with every classifier).
    # Confidence at (exit 1, exit 2), R right / W wrong; the last exit is right on all four.
    #   image 0: 0.88 R, 0.73 R    image 1: 0.73 W, 0.62 W    image 2: 0.73 W, 0.95 R    image 3: 0.73 R, 0.88 R
    logits = torch.tensor([[[2.0, 0.0], [1.0, 0.0], [3.0, 0.0]], [[2.0, 1.0], [1.0, 0.5], [0.0, 3.0]],
                           [[1.0, 0.0], [0.0, 3.0], [0.0, 3.0]], [[2.0, 3.0], [0.0, 2.0], [0.0, 3.0]]])
    val = evaluate.Predictions(logits, torch.tensor([0, 1, 1, 1]))
    costs = [msdnet.ExitCost(k + 1, 0, macs, 4) for k, macs in enumerate([10, 20, 30])]
    # One threshold, 0.88 at both exits: image 0 leaves at exit 1, images 2 and 3 at exit 2, image 1 at
    # the last: (10 + 20 + 20 + 30) / 4 = 20. No single move from there is cheaper while all stay right.
    one = policies.one_threshold(val, costs, 1.0)
    assert policies.budgeted(val, one, costs).average_cost == 20.0
    # Exit 1 switched off and exit 2 at 0.73: images 0, 2 and 3 leave at exit 2 (6 + 6 + 4, no exit-1
    # classifier), image 1 at the last (6 * 3 + 4 + 4): (16 * 3 + 26) / 4 = 18.5, all right.
    t = policies.per_exit_thresholds(val, costs, 1.0)
    r = policies.budgeted(val, t, costs)
    assert t[0].item() == math.inf and t[1].item() == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item())
    assert (r.accuracy, r.average_cost, r.exit_counts) == (1.0, 18.5, [0, 3, 1])


def test_the_searches_minimize_seconds_as_they_minimize_multiply_accumulates():
    # policy_case's predictions. Counted there, exits cost 1, 2, 3 and the classifiers nothing: exit 1
    # keeps 0.9 and the rest leave at exit 2, (1 + 2 + 2 + 2) / 4 = 1.75. Suppose the clock says each
    # block takes 0.1 s and each classifier 0.9 s: the same split costs (1 + 3 * 2) / 4 = 1.75 s, but
    # switching exit 1 off saves its classifier for everyone, so all four leave at exit 2 for
    # 0.1 + 0.1 + 0.9 = 1.1 s. The search follows the costs it is given, in whichever unit.
    val, counted = policy_case()
    measured = [policies.ExitTime(k, float(k), 0.9) for k in (1, 2, 3)]
    by_count = policies.budgeted(val, policies.per_exit_thresholds(val, counted, 1.0), counted)
    assert (by_count.accuracy, by_count.average_cost, by_count.exit_counts) == (1.0, 1.75, [1, 3, 0])
    t = policies.per_exit_thresholds(val, measured, 1.0)
    by_time = policies.budgeted(val, t, measured)
    assert t[0].item() == math.inf
    assert by_time.accuracy == 1.0 and by_time.exit_counts == [0, 4, 0]
    assert by_time.average_cost == pytest.approx(1.1)


def test_timed_costs_measure_each_block_and_classifier():
    model = msdnet.build("tiny").eval()
    pause = 0.05  # seconds added to block 3 and to classifier 2, once per call
    model.blocks[2].register_forward_pre_hook(lambda m, i: time.sleep(pause))
    model.classifiers[1].register_forward_pre_hook(lambda m, i: time.sleep(pause))
    images = torch.rand(4, 3, 32, 32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: a second, busy process on the machine cannot stall a parallel region
    try:
        costs = earlyexit.timed_costs(model, images, repeats=2)
    finally:
        torch.set_num_threads(threads)
    assert [c.exit for c in costs] == [1, 2, 3, 4]
    step = [c.seconds - (costs[k - 1].seconds if k else 0.0) for k, c in enumerate(costs)]  # block + classifier
    blocks = [s - c.classifier_seconds for s, c in zip(step, costs)]
    per_image = pause / len(images)
    assert blocks[2] >= per_image and max(blocks[:2] + blocks[3:]) < per_image / 2
    assert costs[1].classifier_seconds >= per_image
    assert max(c.classifier_seconds for k, c in enumerate(costs) if k != 1) < per_image / 2
    assert all(s > 0 for s in blocks) and all(c.classifier_seconds > 0 for c in costs)


def test_costs_of_two_kinds_are_refused():
    val, counted = policy_case()
    mixed = [counted[0], policies.ExitTime(2, 2.0, 0.0), policies.ExitTime(3, 3.0, 0.0)]
    with pytest.raises(TypeError, match="all msdnet.ExitCost or all policies.ExitTime"):
        policies.budgeted(val, torch.tensor([0.5, 0.5, -math.inf]), mixed)


@pytest.mark.parametrize("score", ["margin", "entropy"])
def test_real_early_exit_follows_any_score(tiny_folder, score):
    model = msdnet.build("tiny").eval()
    split = data.load("test", source=tiny_folder)
    preds = evaluate.predict(model, split, cache=False)
    s = preds.scores(score)
    thresholds = torch.quantile(s, 0.6, dim=0)
    want_exit = policies.exit_points(s, thresholds)
    got_class, got_exit = earlyexit.EarlyExit(model, thresholds, score=score)(split.images.float() / 255)
    assert got_exit.tolist() == want_exit.tolist()
    assert got_class.tolist() == preds.predicted.gather(1, want_exit[:, None] - 1).squeeze(1).tolist()


def test_functions_that_borrow_the_model_give_it_back_in_its_mode(tiny_folder):
    from helpers import analysis, faithfulness, gradcam

    model = msdnet.build("tiny").train()
    split = data.load("test", source=tiny_folder)
    x = split.images[:4].float() / 255
    stats = model.blocks[0][0].convs[0][1].running_mean.clone()
    rng = torch.get_rng_state()
    earlyexit.EarlyExit(model, torch.zeros(model.n_exits))(x)
    earlyexit.LastExitOnly(model)(x)
    evaluate.predict(model, split, cache=False)
    evaluate.exit_logits(model, x, flip=True)
    evaluate.exit_accuracies(model, split)
    gradcam.gradcam(model, x, exit=2)
    analysis.cascading_randomization(model, x, exit=2)
    faithfulness.road(model, x, torch.rand(4, 32, 32, generator=torch.Generator().manual_seed(0)), exit=2, targets=split.labels[:4], percentiles=(50,))
    msdnet.exit_costs(model)
    assert model.training and torch.equal(stats, model.blocks[0][0].convs[0][1].running_mean)  # eval mode inside
    assert torch.equal(rng, torch.get_rng_state())  # seeded work (the re-initialization) on a random state of its own


def test_a_target_in_percent_and_thresholds_as_a_list_are_understood_or_refused_clearly():
    torch.manual_seed(0)
    model = msdnet.build("tiny").eval()
    preds = evaluate.Predictions(torch.randn(50, model.n_exits, 10), torch.randint(0, 10, (50,)))
    costs = msdnet.exit_costs(model)
    for search in (policies.per_exit_thresholds, policies.one_threshold, policies.cheapest_matching):
        for bad in (89.8, 0.0, -0.5):  # 89.8 meant 89.8%: no thresholds reach it, every exit would go dark
            with pytest.raises(ValueError, match=r"target is an accuracy between 0 and 1 \(0.898 for 89.8%\)"):
                search(preds, costs, bad)
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    as_list = [0.5, float("inf"), 0.2, float("-inf")]
    got = earlyexit.EarlyExit(model, as_list)(x)
    want = earlyexit.EarlyExit(model, torch.tensor(as_list))(x)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    for bad, got in (([0.5, 0.5], 2), (0.5, 1), ([as_list, as_list], 8)):
        with pytest.raises(ValueError, match=f"need one threshold per exit, 4 in all, got {got}"):
            earlyexit.EarlyExit(model, bad)
    # Thresholds in percent would send every image to the last exit: refused, by the runtime and the simulation.
    for run in (lambda t: earlyexit.EarlyExit(model, t), lambda t: policies.budgeted(preds, t, costs)):
        with pytest.raises(ValueError, match=r"confidence thresholds lie at or below 1 \(0.9 for 90%\), got 90"):
            run([90, 90, 90, float("-inf")])
    with pytest.raises(ValueError, match="must not be NaN"):
        earlyexit.EarlyExit(model, [0.5, float("nan"), 0.5, float("-inf")])


def test_the_cross_validated_safety_is_zero_when_nothing_can_be_lost_and_the_largest_when_all_is_luck():
    g = torch.Generator().manual_seed(3)
    n, k = 2000, 4
    costs = [msdnet.ExitCost(e + 1, 0, 10 * (e + 1)) for e in range(k)]
    labels = torch.randint(0, 10, (n,), generator=g)
    same = torch.randn(n, 10, generator=g)
    same[torch.arange(n), labels] += 2.0
    clones = evaluate.Predictions(same[:, None].repeat(1, k, 1), labels)  # every exit answers as the last
    assert policies.cross_validated_safety(clones, costs) == 0
    # Early exits right 80% of the time against the last exit's 90%, with confidences that say nothing
    # about it: every early answer costs accuracy, and thresholds that seem to keep it on one half do so
    # by luck. Only a wide margin shuts the early exits on the other half.
    noisy = torch.randn(n, k, 10, generator=g)
    right = torch.rand(n, k, generator=g) < torch.tensor([0.8, 0.8, 0.8, 0.9])
    noisy[torch.arange(n)[:, None], torch.arange(k), torch.where(right, labels[:, None], (labels[:, None] + 1) % 10)] += 3.0
    luck = evaluate.Predictions(noisy, labels)
    assert policies.cross_validated_safety(luck, costs) >= 1
    assert policies.cross_validated_safety(luck, costs, safeties=(0, 0.5)) == 0.5  # none is enough: the largest
    assert policies.cross_validated_safety(luck, costs, tolerance=1.0) == 0  # anything passes: the smallest
    assert policies.cross_validated_safety(luck, costs, search=policies.one_threshold) > 0


def test_empty_inputs_and_bad_ratios_get_one_clear_message(tiny_folder):
    from helpers import gradcam

    model = msdnet.build("tiny").eval()
    split = data.load("test", source=tiny_folder)
    empty = data.Split(split.images[:0], split.labels[:0])
    for run in (lambda: evaluate.exit_accuracies(model, empty), lambda: evaluate.predict(model, empty, cache=False),
                lambda: gradcam.maps_for_split(model, empty, cache=False)):
        with pytest.raises(ValueError, match="the split holds no images"):
            run()
    with pytest.raises(ValueError, match="needs at least one image"):
        earlyexit.timed_costs(model, torch.rand(0, 3, 32, 32))
    val = evaluate.Predictions(torch.randn(20, 4, 10), torch.randint(0, 10, (20,)))
    for q in (0, -0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="q must be a positive number"):
            policies.budget_thresholds(val, q)


# ----------------------------------------------------------------------------- issue 44: inputs checked, one line each


def test_a_split_of_float_images_in_0_1_is_read_as_such_not_divided_again(tiny_folder):
    model = msdnet.build("tiny").eval()
    split = data.load("test", source=tiny_folder)
    floats = data.Split(split.images.float() / 255, split.labels)
    want = evaluate.predict(model, split, cache=False)
    got = evaluate.predict(model, floats, cache=False)
    assert torch.allclose(got.logits, want.logits, atol=1e-5)
    assert evaluate.exit_accuracies(model, floats) == pytest.approx(evaluate.exit_accuracies(model, split))
    assert floats.images.dtype == torch.float32 and floats.images.max() <= 1  # the caller's split as given


def test_a_split_of_float_images_in_0_255_or_with_other_lengths_is_refused_in_one_line(tiny_folder):
    model = msdnet.build("tiny").eval()
    split = data.Split(torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8), torch.arange(6))
    cases = [(data.Split(split.images.float(), split.labels), r"float between 0 and 2\d\d; .* images / 255"),
             (data.Split(split.images, split.labels[:5]), r"one integer label per image, \[6\], got torch.int64 \[5\]"),
             (data.Split(split.images, split.labels.float()), "one integer label per image"),
             (data.Split(split.images[:, :1], split.labels), r"must be \[N, 3, H, W\], got \[6, 1, 32, 32\]")]
    for bad, message in cases:
        for run in (lambda: evaluate.predict(model, bad, cache=False), lambda: evaluate.exit_accuracies(model, bad)):
            with pytest.raises(ValueError, match=message) as e:
                run()
            assert "\n" not in str(e.value)
    for size in (0, -1, 2.0, True):
        with pytest.raises((ValueError, TypeError), match=f"batch_size must be a whole number >= 1, got {size!r}"):
            evaluate.predict(model, split, batch_size=size, cache=False)


def test_metrics_refuse_what_is_not_predictions_or_booleans_in_one_line():
    p = hand_made()
    with pytest.raises(ValueError, match=r"labels must be integer \[N\] with N = 4"):
        evaluate.difficulty(evaluate.Predictions(p.logits, p.labels[:3]))
    with pytest.raises(TypeError, match="must be evaluate.Predictions"):
        evaluate.class_exit_accuracy((p.logits, p.labels))
    with pytest.raises(ValueError, match=r"correct must be bool \[N, ...\] \(e.g. preds.correct\), got torch.int64"):
        evaluate.accuracy_with_ci(p.correct.long())
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        evaluate.scores([[1.0, 2.0]])


def test_a_stored_file_with_other_keys_or_another_shape_is_recomputed_with_one_warning(tiny_folder, tmp_path):
    import warnings

    model = msdnet.build("tiny").eval()
    split = data.load("test", source=tiny_folder)
    want = evaluate.predict(model, split, cache_dir=tmp_path)
    (path,) = tmp_path.glob("predictions-*.pt")
    for other in ({"maps": torch.zeros(3)}, {"logits": torch.zeros(len(split), 3, 10), "labels": split.labels},
                  {"logits": want.logits, "labels": split.labels.flip(0)}):
        torch.save(other, path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert evaluate.cached_predictions(model, split, tmp_path) is None  # never returned as predictions
            torch.save(other, path)
            got = evaluate.predict(model, split, cache_dir=tmp_path)
        assert torch.equal(got.logits, want.logits) and torch.equal(got.labels, split.labels)
        said = [str(w.message) for w in caught]
        assert len(said) == 2 and all(s.startswith(f"the cache file {path} holds something else") for s in said)
        assert all("\n" not in s for s in said)


def test_predictions_are_computed_anew_when_the_forward_code_changes(tiny_folder, tmp_path, monkeypatch):
    from helpers import cache

    model = msdnet.build("tiny").eval()
    split = data.load("test", source=tiny_folder)
    evaluate.predict(model, split, cache_dir=tmp_path)
    real = cache._source_hash
    monkeypatch.setattr(cache, "_source_hash", lambda m: real(m) + ("walk edited" if m is msdnet else ""))
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(1))
    evaluate.predict(model, split, cache_dir=tmp_path)
    assert calls and len(list(tmp_path.glob("predictions-*.pt"))) == 2


def stream_case(n: int = 60):
    torch.manual_seed(0)
    model = msdnet.build("tiny").eval()
    images = torch.rand(n, 3, 32, 32)
    with torch.no_grad():
        confidence = torch.stack([logits.softmax(-1).amax(-1) for logits in model(images)], 1)
    early = earlyexit.EarlyExit(model, confidence.quantile(0.75, dim=0))  # about a quarter leave at each exit
    return model, images, early


def test_a_stream_whose_block_raises_is_left_as_it_was():
    model, images, early = stream_case()
    want_class, want_exit = early(images)
    failing = []

    def out_of_memory(module, args):
        if failing:
            raise RuntimeError("out of memory, say")

    model.blocks[2].register_forward_pre_hook(out_of_memory)
    stream = earlyexit.EarlyExitStream(early, batch_size=8)
    stream.feed(images[:20])
    failing.append(1)
    with pytest.raises(RuntimeError, match="out of memory, say"):
        stream.feed(images[20:45])  # blocks 1 and 2 run and refill their queues before block 3 fails
    failing.clear()
    stream.feed(images[20:])  # the same images again, as a caller retries
    failing.append(1)
    with pytest.raises(RuntimeError, match="out of memory, say"):
        stream.finish()
    failing.clear()
    got_class, got_exit = stream.finish()
    assert got_exit.tolist() == want_exit.tolist() and got_class.tolist() == want_class.tolist()
    failing.append(1)
    with pytest.raises(RuntimeError, match="out of memory, say"):
        stream(images)
    failing.clear()
    got_class, got_exit = stream(images)  # a failed call as a whole left the stream empty
    assert got_exit.tolist() == want_exit.tolist() and got_class.tolist() == want_class.tolist()


def test_timed_costs_read_the_clock_only_after_the_device_has_finished(monkeypatch):
    model = msdnet.build("tiny").eval()
    events, clock = [], iter(range(10**6))
    monkeypatch.setattr(earlyexit, "_wait_for", lambda device: events.append(("wait", device.type)))
    monkeypatch.setattr(earlyexit.time, "perf_counter", lambda: events.append(("clock",)) or float(next(clock)))
    costs = earlyexit.timed_costs(model, torch.rand(2, 3, 32, 32), repeats=2)
    reads = [i for i, e in enumerate(events) if e == ("clock",)]
    assert len(reads) == 2 * 2 * 2 * model.n_exits  # start and stop, per repeat, per block and classifier
    assert all(events[i - 1] == ("wait", "cpu") for i in reads)  # on a GPU: torch.cuda.synchronize
    assert [c.exit for c in costs] == [1, 2, 3, 4] and costs[-1].seconds == pytest.approx(8 / 2)  # 1 s per part


def test_q_far_from_1_sends_everyone_to_one_end_instead_of_nan():
    assert policies.exit_shares(1e300, 4).tolist() == pytest.approx([0, 0, 1e-300, 1], abs=1e-310)  # q**k / sum q**k
    assert policies.exit_shares(1e-300, 4).tolist() == pytest.approx([1, 1e-300, 0, 0], abs=1e-310)
    assert policies.exit_shares(2.0, 3).tolist() == pytest.approx([2 / 14, 4 / 14, 8 / 14])
    val = evaluate.Predictions(torch.randn(20, 4, 10), torch.randint(0, 10, (20,)))
    assert policies.budget_thresholds(val, 1e300).tolist() == [math.inf] * 3 + [-math.inf]
    for bad, message in ((lambda: policies.one_threshold(val, msdnet.exit_costs(msdnet.build("tiny")), 0.5, safety=-1),
                          "safety must be a number of standard errors >= 0"),
                         (lambda: policies.per_exit_thresholds(val, [], 0.5), "need one cost per exit, 4 in all, got 0")):
        with pytest.raises(ValueError, match=message):
            bad()
