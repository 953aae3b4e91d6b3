// edgepack iOS / macOS sample: load the exported .mlpackage (Xcode compiles it to .mlmodelc), create the KV-cache
// state, run prefill + a greedy decode loop, everything read from model_info.json. Documentation-grade: not
// compiled by edgepack's tests. Needs iOS 18 / macOS 15 (MLState).
// Tokenization is not shown: encode the prompt with tokenizer.json and the chat template in tokenizer_config.json,
// e.g. with swift-transformers' Tokenizers (AutoTokenizer.from(modelFolder:)).
import CoreML
import Foundation

struct ModelInfo: Decodable {
    let context_length: Int
    let vocab_size: Int
    let eos_token_ids: [Int]
}

@available(iOS 18.0, macOS 15.0, *)
final class EdgepackLlm {
    let model: MLModel
    let info: ModelInfo
    private var state: MLState
    private var length = 0  // tokens in the cache

    init(modelName: String = "model_int4") throws {
        let infoURL = Bundle.main.url(forResource: "model_info", withExtension: "json")!
        info = try JSONDecoder().decode(ModelInfo.self, from: Data(contentsOf: infoURL))
        let url = Bundle.main.url(forResource: modelName, withExtension: "mlmodelc")!
        let config = MLModelConfiguration()
        config.computeUnits = .cpuAndGPU  // flexible shapes: the GPU/CPU path
        model = try MLModel(contentsOf: url, configuration: config)
        state = model.makeState()
    }

    /// One call: `ids` are the new tokens (the prompt for prefill, one token for decode). Returns the last logits.
    private func step(_ ids: [Int]) throws -> [Float] {
        let steps = ids.count, end = length + steps
        precondition(end <= info.context_length, "context length \(info.context_length) exceeded")
        let inputIds = try MLMultiArray(shape: [1, NSNumber(value: steps)], dataType: .int32)
        for (t, id) in ids.enumerated() { inputIds[t] = NSNumber(value: id) }
        // causal_mask [1, 1, T, E]: 0 where query t (at slot length + t) may look at slot e, else -65504
        let mask = try MLMultiArray(shape: [1, 1, NSNumber(value: steps), NSNumber(value: end)], dataType: .float16)
        for t in 0..<steps { for e in 0..<end { mask[t * end + e] = NSNumber(value: e <= length + t ? 0 : -65504) } }
        let inputs = try MLDictionaryFeatureProvider(dictionary: ["input_ids": inputIds, "causal_mask": mask])
        let out = try model.prediction(from: inputs, using: state)
        length = end
        let logits = out.featureValue(for: "logits")!.multiArrayValue!  // [1, T, vocab]
        let base = (steps - 1) * info.vocab_size
        return (0..<info.vocab_size).map { logits[base + $0].floatValue }
    }

    /// Greedy generation from chat-templated prompt ids; returns the generated ids (end-of-turn included).
    func generate(prompt: [Int], maxNewTokens: Int = 128) throws -> [Int] {
        state = model.makeState()  // a fresh cache per conversation
        length = 0
        var logits = try step(prompt)
        var out: [Int] = []
        for _ in 0..<maxNewTokens {
            let next = logits.indices.max { logits[$0] < logits[$1] }!
            out.append(next)
            if info.eos_token_ids.contains(next) { break }
            logits = try step([next])
        }
        return out
    }
}
