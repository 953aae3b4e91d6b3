// edgepack iOS / macOS sample: load the exported .mlpackage (or the chain of them model_info.json lists; Xcode
// compiles each to .mlmodelc), create the KV-cache state, run prefill + a greedy decode loop, everything read from
// model_info.json. Documentation-grade: not compiled by edgepack's tests. Needs iOS 18 / macOS 15 (MLState).
// Tokenization is not shown: encode the prompt with tokenizer.json and the chat template in tokenizer_config.json,
// e.g. with swift-transformers' Tokenizers (AutoTokenizer.from(modelFolder:)).
import CoreML
import Foundation

/// A variant's packages: one name, or (a model over the exporter's chunk size) the chain's names in order.
enum PackageNames: Decodable {
    case one(String), chain([String])
    init(from decoder: Decoder) throws {
        let value = try decoder.singleValueContainer()
        if let name = try? value.decode(String.self) { self = .one(name) } else { self = .chain(try value.decode([String].self)) }
    }
    var names: [String] { switch self { case .one(let n): return [n]; case .chain(let ns): return ns } }
}

struct ModelInfo: Decodable {
    let context_length: Int
    let vocab_size: Int
    let eos_token_ids: [Int]
    let files: [String: PackageNames]
}

@available(iOS 18.0, macOS 15.0, *)
final class EdgepackLlm {
    let models: [MLModel]  // one, or a chain: each takes the previous one's hidden_out as hidden_in
    let info: ModelInfo
    private var states: [MLState]  // one per package: each holds its own layers' cache
    private var length = 0  // tokens in the cache

    init(variant: String = "int4") throws {
        let infoURL = Bundle.main.url(forResource: "model_info", withExtension: "json")!
        let decoded = try JSONDecoder().decode(ModelInfo.self, from: Data(contentsOf: infoURL))
        let config = MLModelConfiguration()
        config.computeUnits = .cpuAndGPU  // flexible shapes: the GPU/CPU path
        let loaded = try decoded.files[variant]!.names.map { name in
            let compiled = (name as NSString).deletingPathExtension  // Xcode compiles X.mlpackage to X.mlmodelc
            return try MLModel(contentsOf: Bundle.main.url(forResource: compiled, withExtension: "mlmodelc")!,
                               configuration: config)
        }
        info = decoded
        models = loaded
        states = loaded.map { $0.makeState() }
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
        var input: (name: String, value: MLMultiArray) = ("input_ids", inputIds)
        var logits: MLMultiArray? = nil  // [1, T, vocab], from the last package
        for (i, model) in models.enumerated() {
            let inputs = try MLDictionaryFeatureProvider(dictionary: [input.name: input.value, "causal_mask": mask])
            let out = try model.prediction(from: inputs, using: states[i])
            if let last = out.featureValue(for: "logits")?.multiArrayValue {
                logits = last
            } else {
                input = ("hidden_in", out.featureValue(for: "hidden_out")!.multiArrayValue!)
            }
        }
        length = end
        let base = (steps - 1) * info.vocab_size
        return (0..<info.vocab_size).map { logits![base + $0].floatValue }
    }

    /// Greedy generation from chat-templated prompt ids; returns the generated ids (end-of-turn included).
    func generate(prompt: [Int], maxNewTokens: Int = 128) throws -> [Int] {
        states = models.map { $0.makeState() }  // a fresh cache per conversation
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
